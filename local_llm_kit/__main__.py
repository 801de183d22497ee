from local_llm_kit.cli import main

raise SystemExit(main())
