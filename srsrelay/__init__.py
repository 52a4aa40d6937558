"""srsrelay: RTMP in, WebRTC (WHEP) out."""

__version__ = "0.1.0"
