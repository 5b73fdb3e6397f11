from brainpaint.cli import main

main()
