"""`python -m dicomflow.redisstore`: the `dicomflow-redis` command."""

from dicomflow.redisstore.cli import main

raise SystemExit(main())
