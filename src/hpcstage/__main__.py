from hpcstage.cli import main

raise SystemExit(main())
