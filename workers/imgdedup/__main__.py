from imgdedup.cli import main

main()
