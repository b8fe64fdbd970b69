from lorahub.cli.app import main

main()
