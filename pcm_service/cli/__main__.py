"""`python -m pcm_service.cli`: the same as `pcm`."""
from pcm_service.cli import main

main()
