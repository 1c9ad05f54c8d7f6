from storm_hf.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
