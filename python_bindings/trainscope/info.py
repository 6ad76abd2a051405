"""``python -m trainscope.info``: prints :func:`trainscope.build_info` as JSON, for bug reports."""

import json

from trainscope import build_info


def main() -> None:
    print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
