import sys

from sglang_evict.cli import main

sys.exit(main())
