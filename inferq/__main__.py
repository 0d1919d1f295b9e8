from inferq.cli import main

main()
