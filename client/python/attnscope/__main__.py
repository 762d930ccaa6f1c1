from .viewer_cli import main

main()
