from cellmap_repro.cli import main

# Guarded: loader workers are spawned processes, which import the main module again.
if __name__ == "__main__":
    raise SystemExit(main())
