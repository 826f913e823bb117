#!/usr/bin/env python3
"""Child entry for `benches/local_read_bench.py`: the peer benchmark's `peers.py` with the mkts peers
added. peers.py runs every peer in its own process as `python <dir>/peers.py --peers NAME …`; pointing
<dir> here lets those children know the added peers too."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import local_read_bench  # noqa: E402  (imports the benchmark's own peers module and registers the peers)

sys.exit(local_read_bench.peers.main(sys.argv[1:]))
