from martlet.server import main

raise SystemExit(main())
