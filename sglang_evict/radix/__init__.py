"""The radix cache with holes: which head-slots the prefix tree holds, and who else lists them."""
