from awsomefsd.cli.main import main

raise SystemExit(main())
