"""blockd: a DNS forwarder that sinkholes TikTok/ByteDance for government-device networks."""

__version__ = "0.1.0"
