from cellmap_repro.cli import main

raise SystemExit(main())
