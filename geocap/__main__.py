from geocap.cli import main

raise SystemExit(main())
