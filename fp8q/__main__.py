from fp8q.cli import main

main()
