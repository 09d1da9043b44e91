from skiplock.cli import main

main()
