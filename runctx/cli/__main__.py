from runctx.cli.main import main

main()
