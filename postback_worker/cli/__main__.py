from postback_worker.cli import main

main()
