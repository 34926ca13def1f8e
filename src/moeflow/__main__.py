from moeflow.cli import main

raise SystemExit(main())
