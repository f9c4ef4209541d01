from rke2_mirror.cli.app import main

main()
