from kurrier.cli.main import main

raise SystemExit(main())
