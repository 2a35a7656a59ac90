"""`python -m ssmq` runs the CLI."""

from ssmq.cli.main import main

main()
