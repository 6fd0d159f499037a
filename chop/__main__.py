from chop.cli import main

main()
