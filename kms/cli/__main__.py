from kms.cli import main

raise SystemExit(main())
