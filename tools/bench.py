"""`slagen bench` without the console script: python tools/bench.py --seq-len 32760 --json out.json"""

from slagen.cli import bench

if __name__ == "__main__":
    bench()
