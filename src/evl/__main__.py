from evl.cli import main

raise SystemExit(main())
