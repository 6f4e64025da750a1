from kvlab.report.cli import main

raise SystemExit(main())
