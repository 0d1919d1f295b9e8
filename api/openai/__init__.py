"""OpenAI's API shape: its request bodies (requests.py), its answers built from a job's events (answers.py),
its errors (errors.py) and the routes (routes.py). The batch runner answers lines with the same builder."""
