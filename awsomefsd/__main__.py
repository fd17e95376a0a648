from awsomefsd.cli import main

raise SystemExit(main())
