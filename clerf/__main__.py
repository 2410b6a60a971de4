"""``python -m clerf`` (also ``accelerate launch -m clerf ...``)."""

from clerf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
