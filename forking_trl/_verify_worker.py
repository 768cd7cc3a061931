"""A math-verify worker: reads `[gold, answer]` JSON lines on stdin, writes the reward as a JSON line on stdout.

Started by `forking_trl.rewards.MathVerifier`, which kills it when an item overruns its deadline.
"""

import json
import sys


def main() -> None:
    from forking_trl.rewards import verify_pair

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        try:
            gold, answer = json.loads(line)
            result = verify_pair(gold, answer)
        except Exception:  # noqa: BLE001  (a reward never raises)
            result = 0.0
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
