from relaykv.cli import main

raise SystemExit(main())
