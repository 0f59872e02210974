from blocktrack.cli import main

raise SystemExit(main())
