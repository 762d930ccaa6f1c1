from .view import main

main()
