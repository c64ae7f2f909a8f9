"""Asset group `recommendation`: metrics, champions, and the promotion gates checked on them."""
