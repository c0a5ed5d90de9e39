"""The `fp8q` command, also run as `python -m fp8q`."""

import gc


def main() -> None:
    # Importing torch makes a few hundred thousand objects that live until exit. The garbage
    # collector would walk them over and over during the imports (0.15 s) and once more at exit
    # (0.4 s), freeing nothing: import with it off, then set them aside for good.
    gc.disable()
    try:
        from fp8q.cli import app
    finally:
        gc.freeze()
        gc.enable()
    app()


if __name__ == "__main__":
    main()
