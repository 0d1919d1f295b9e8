"""Key names are a wire contract between processes of possibly different versions: pin them."""
from queue_schema import keys


def test_key_names_are_pinned():
    assert keys.queue_name("tiny", "high") == "inferq.tiny.high"
    assert keys.job_events("j1") == "inferq:job:j1:events"
    assert keys.job_channel("j1") == "inferq:job:j1:live"
    assert keys.job_cancel("j1") == "inferq:job:j1:cancel"
    assert keys.worker("w1") == "inferq:worker:w1"
    assert keys.job_lease("j1") == "inferq:job:j1:lease"
    assert keys.model_wake("tiny") == "inferq:model:tiny:wake"
    assert keys.rq_queue("inferq.tiny.high") == "rq:queue:inferq.tiny.high"
    assert keys.rq_job("j1") == "rq:job:j1"
    assert keys.LEASES == "inferq:leases"
    assert keys.OPEN_JOBS == "inferq:jobs:open"
    assert keys.REAPER == "inferq:reaper"
    assert keys.model("tiny") == "inferq:model:tiny"
    assert keys.model_workers("tiny") == "inferq:model:tiny:workers"
    assert keys.WORKERS == "inferq:workers"
    assert keys.MODELS == "inferq:models"
    assert keys.CANCEL_CHANNEL == "inferq:cancel"
    assert keys.NARRATION_CHANNEL == "inferq:narration"
    assert keys.NARRATION_LOG == "inferq:narration:log"
    assert keys.PRIORITIES == ("high", "normal", "low")
    assert keys.COUNTERS == "inferq:stats:counters"
    assert keys.histogram("ttft_seconds", "tiny") == "inferq:stats:hist:ttft_seconds:tiny"


def test_no_other_module_spells_a_key():
    import pathlib
    import re

    spelled = re.compile(r"""['"]inferq[:.](job|worker|workers|model|models|cancel|narration|stats)\b""")

    root = pathlib.Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("api", "worker", "queue_schema", "inferq"):
        for path in (root / package).rglob("*.py"):
            if path.name == "keys.py":
                continue
            text = path.read_text()
            if spelled.search(text):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
