from postback_worker.cli.group import main

main()
