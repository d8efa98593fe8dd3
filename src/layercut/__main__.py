from layercut.cli import main

raise SystemExit(main())
