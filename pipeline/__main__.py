from hepreg.cli import main

main()
