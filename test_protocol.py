"""Tests for fmz_custom_protocol, the FMZ custom-protocol plugin for OKX.

Run with `python3 -m unittest test_protocol` (add `-v` to see every test by name);
`python3 test_protocol.py durations` runs the same and lists the slowest tests.

The tests talk to the plugin the way FMZ's docker does, and point the plugin at a fake OKX defined in
this file (section "Fake OKX"):

- `FakeOKX` is an OKX v5 REST exchange on 127.0.0.1: public market data (instruments, tickers, books,
  trades, candles, funding) and the signed account and trade endpoints, with OKX's field names,
  string-typed numbers, error codes and HTTP statuses. It keeps balances, orders, positions and leverage
  per API key, records every request, and can inject faults (timeouts, resets, 5xx, garbage, 429),
  clock skew, latency and OKX's rate limits.
- `FakeProxy` is an HTTP CONNECT proxy (optionally with Basic authentication) for the proxy tests.
- `okx_request()` signs and sends one request straight to the fake; `FakeSelfTest` uses it to check the
  fake itself, so that a failing plugin test is never the fake's fault.
"""
import base64
import collections
import contextlib
import datetime as dt
import gc
import hashlib
import hmac
import http.client
import io
import json
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import unittest
import unittest.mock
import urllib.parse
import zlib
from collections import deque, namedtuple
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

# ---- Fake OKX ----

# -- time: the clock the fakes (and the plugin) read ------------------------------------------------------
#
# Every reading of the time that matters for OKX's rules (signature window, expTime, cTime/uTime/ts, rate
# limit windows, the stream's idle rule and push delays) goes through a clock object with the four methods
# the plugin's `Config(clock=...)` takes: time(), monotonic(), sleep(seconds), wait(event, timeout), plus
# true_time(), what the exchange's own clock reads. REAL_CLOCK is the default; a test that passes one
# VirtualClock to the plugin and to the fakes runs on virtual time. Simulated network costs (latency_ms,
# handshake_ms, the slow/timeout faults, socket polling) always stay real.

_VIRTUAL_POLL_S = 0.005     # real seconds between looks of VirtualClock.wait at its event and deadline
_VIRTUAL_YIELD_S = 0.0002   # real pause of VirtualClock.sleep, so that other threads get the GIL


class RealClock:
    """The machine's clocks: host wall clock, monotonic clock, real sleeps and waits."""

    def time(self):
        return time.time()

    def true_time(self):
        """What the exchange's clock reads: here the same as the host's wall clock."""
        return time.time()

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        time.sleep(max(0.0, seconds))

    def wait(self, event, timeout):
        """True if `event` got set within `timeout` seconds (None: wait for it without limit)."""
        return event.wait(timeout)


REAL_CLOCK = RealClock()


class VirtualClock:
    """Time that passes only when a test says so (`advance`) or a thread sleeps (`sleep`).

        clock = VirtualClock()
        clock.monotonic()      # 10000.0, then whatever advance()/sleep() made of it
        clock.true_time()      # the exchange's clock: real time.time() at creation + virtual elapsed
        clock.time()           # the host's wall clock: true_time() + every step_wall() so far
        clock.advance(5)       # 5 s pass for every clock; threads in wait() whose deadline came return
        clock.step_wall(-40)   # only the host's wall clock jumps (an NTP step, a VM resume)

    `sleep(s)` returns at once with time moved to max(now, now at the call + s), so a sleeping thread
    drives time. `wait(event, timeout)` never moves time: it returns True as soon as `event` is set and
    False once time (moved by advance() or another thread's sleep()) reaches its deadline; `waiting()`
    lists the deadlines of the threads in wait() now (where a stream's thread is parked, say). One lock
    and condition guard everything.
    """

    def __init__(self, start=10000.0, true_start=None):
        self._cond = threading.Condition(threading.Lock())
        self._start = self._now = float(start)
        self._true_start = time.time() if true_start is None else float(true_start)
        self._wall_step = 0.0
        self._waiting = []          # deadlines of the threads in wait() (and LockstepClock's sleep())

    def monotonic(self):
        with self._cond:
            return self._now

    def true_time(self):
        with self._cond:
            return self._true_start + (self._now - self._start)

    def time(self):
        with self._cond:
            return self._true_start + (self._now - self._start) + self._wall_step

    def advance(self, seconds):
        """Let `seconds` (>= 0) pass: monotonic, true and host time move together; waiters wake."""
        if seconds < 0:
            raise ValueError("time does not run backwards: %r" % (seconds,))
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def step_wall(self, seconds):
        """Jump only the host's wall clock by `seconds` (either sign); monotonic and true time stay."""
        with self._cond:
            self._wall_step += seconds

    def sleep(self, seconds):
        with self._cond:
            target = self._now + max(0.0, seconds)
            if target > self._now:
                self._now = target
                self._cond.notify_all()
        time.sleep(_VIRTUAL_YIELD_S)

    def wait(self, event, timeout):
        """True as soon as `event` is set; False once virtual time reaches the call's time + `timeout`."""
        if timeout is None:
            return event.wait()
        with self._cond:
            deadline = self._now + max(0.0, timeout)
            self._waiting.append(deadline)
        try:
            while not event.is_set():
                with self._cond:
                    if self._now >= deadline:
                        break
                    self._cond.wait(_VIRTUAL_POLL_S)
        finally:
            with self._cond:
                self._waiting.remove(deadline)
        return event.is_set()

    def waiting(self):
        """The deadlines (monotonic) of the threads now in wait(), earliest first."""
        with self._cond:
            return sorted(self._waiting)


class LockstepClock(VirtualClock):
    """A VirtualClock for many robots at once: time moves only while every busy request waits for it.

    On a VirtualClock one thread's sleep() moves time at once, so a request that another thread has on
    its way to OKX meanwhile arrives seconds after it left, as no network would have it: OKX then counts
    it in a later rate window than the plugin did. Here each robot wraps its call in ``with
    clock.busy():``, and sleep() and wait() block until every busy call is blocked in one of them; then
    time jumps to the earliest deadline among them. Time thus stands still while any call is being sent,
    served or answered, and moves as fast as the waits allow.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy = 0

    @contextlib.contextmanager
    def busy(self):
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _block(self, deadline, event):
        with self._cond:
            self._waiting.append(deadline)
            try:
                while self._now < deadline and not event.is_set():
                    earliest = min(self._waiting)
                    if len(self._waiting) >= self._busy and self._now < earliest < math.inf:
                        self._now = earliest          # every busy call waits: the next one is due
                        self._cond.notify_all()
                    else:
                        self._cond.wait(_VIRTUAL_POLL_S)
            finally:
                self._waiting.remove(deadline)

    def sleep(self, seconds):
        with self._cond:
            deadline = self._now + max(0.0, seconds)
        self._block(deadline, threading.Event())

    def wait(self, event, timeout):
        with self._cond:
            deadline = math.inf if timeout is None else self._now + max(0.0, timeout)
        self._block(deadline, event)
        return event.is_set()


# A self-signed certificate for CN 127.0.0.1 (subjectAltName IP:127.0.0.1, DNS:localhost; RSA 2048,
# valid 100 years), made once with:
#   openssl req -x509 -newkey rsa:2048 -nodes -days 36500 -subj /CN=127.0.0.1 \
#       -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout key.pem -out cert.pem
TEST_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUZCSeojDWJqCQsbKA6Mm4bfudcBkwDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyNTE1NTIzNloYDzIxMjYx
MTAxMTU1MjM2WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQClx2rMcRFm21JglN6hbWJbWjgghlPHz9uDtmwUtjOb
0ikahUETs/KlecT1pto+579QMgZPVhQmgTaMEgNKhKJWfCIx8HiyO1TQUGJ9I3rg
C6LlJPG0eXTDosWkrRHfc8U45gRIJvd0vS9pAlKz0IJPgCWIweo6OWzBCoe9XP7h
rW1XiVlCM3pIZJ7SPhijs6yMJ9lfgyVBTrTdoCWHe5KhiTUEBYPMJrE2xg+nzx7W
Zv8Js/T+0K2HiINCeU/QNcKYJmPrvNHEK8Xn2DrLOcBMdjx/tVH8q/7wD5c35b9c
dc/olYFM692X89PcuOpG2ZFyGlpJ6Oq70b5f1lAG7JirAgMBAAGjbzBtMB0GA1Ud
DgQWBBRTxlm5nw58v+JoYzuZg0nhnHUknjAfBgNVHSMEGDAWgBRTxlm5nw58v+Jo
YzuZg0nhnHUknjAPBgNVHRMBAf8EBTADAQH/MBoGA1UdEQQTMBGHBH8AAAGCCWxv
Y2FsaG9zdDANBgkqhkiG9w0BAQsFAAOCAQEAWVOH0A0AQdNXyt24IkluEL2SkGR0
bTm8YSsoLuB5CSQR0EZo9lRTu29jcSGfz+Y70axm6i6D4dbghcLkiwu705FSZ49A
RhYY8dMp9M7RPoo3BF7Opjmb2uF97/JeV9S14GwgJwEmxn2kKP07V9MxnSbI9E4F
4pDuUoCSIPRHZWNDWV/LvlMuXtumHJaizt5T8l68IPy9yrN9WYMwe7yIW2qTXoHr
OuAIHIX3YxnchRTJXKN/ujwLFrSLRWwtzfBLWJZJRkNlmfLxKL4kL8KjI3ao5K9v
SMz7unxEbvCK8ZmJ9JaDtBmXFmIrs/okujbNrOMkOMQqJ5CLV9jQRh8DIQ==
-----END CERTIFICATE-----
"""

TEST_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQClx2rMcRFm21Jg
lN6hbWJbWjgghlPHz9uDtmwUtjOb0ikahUETs/KlecT1pto+579QMgZPVhQmgTaM
EgNKhKJWfCIx8HiyO1TQUGJ9I3rgC6LlJPG0eXTDosWkrRHfc8U45gRIJvd0vS9p
AlKz0IJPgCWIweo6OWzBCoe9XP7hrW1XiVlCM3pIZJ7SPhijs6yMJ9lfgyVBTrTd
oCWHe5KhiTUEBYPMJrE2xg+nzx7WZv8Js/T+0K2HiINCeU/QNcKYJmPrvNHEK8Xn
2DrLOcBMdjx/tVH8q/7wD5c35b9cdc/olYFM692X89PcuOpG2ZFyGlpJ6Oq70b5f
1lAG7JirAgMBAAECggEAG5yYZuQvlXsoQFqWA5B4K7uzfNoCxaq9kYrme5imsJMT
h42e+4zNoyQiBcG8Y3KEGfO1u1ccqhZ8IwkJBUthd+2Ftd2rV2cBxw9B0ugARPrg
hIa1FMM6Cy+8TaO0m2GT/YMflB5Gub9HpezeINcKLVBXGsJ5pH2rZd0UI2/ZgCBM
XDq4vEULsA/USKYccqce9NMauA4KmlZQnB3oqVnTJNOkp7cTxjp8IN3erc6nLhrO
2Knt63dbXl3r702RrI+556fq0zSe8vGMiVGlkDdoHolB0SV1OyK+F2rvqWjYqExz
5BAnJt8jdqtCkVMEtBDPOm4y72ZwiKyNyrItvVFumQKBgQDU0fsqTgn7FiDkcaNN
cIifCS/92MTAWMDJqdwhMsCbw7A97HMQi5Q9eXwE5mWgMgspf7va7VpAXMNQ66yD
n2lYiEPuwDFjMN7EHG5vMNbcrjUhQwaaTRp0RX+XvgaQc3hWMLuAXW6UKkiDD8U1
m526y3tOpI+yqmjtp88IgOVz/wKBgQDHahUvUEXsHX03vE137uxxlbaRjab3HkU5
mAlbCWWv6Ev1ERb+D4LZCcya5v+rWyXk+6waGRgEq0iKE9jKS7RtVCC4f9qWonyC
tVsT5RFSOL4xo/ACIjiCsksZshlcDYbPHMRMFavPDL8Snz6wzhh7FijIDKnrtDL/
GCM5fr7rVQKBgE7AQNu/suvJnXRLJK2UNcn7wVmCrBOtA/HbvAxA1osNF5ticpWt
wLYazSyXAQYNXpoFnUL+z4W/jbrU6qpuA7JyAglH7z6QJ+6Twr28adWRVTGwtrHE
VESwLu28sHslb2Mdd1ShvjhviROOc2BJ7Ezh3QgV1uK7Mka28OJpp/6LAoGAMO2G
ZSV9AoH5x0McfuDQgs4JDY2D+f4jXg4/vWaA3LhSar7WtV9462fMG/WxpYmnspdN
ktm1Wu/rzHUyK/CHRIvvu1UjfPJBOpDk1+zMYzAo+mUO7ncXBnpYkuVv83YeLZMR
Vtm6XgLyns8Twq3Os+Sr/Omeh4afPJffjKvcjEECgYEAywuPKAtgGsjvKtUWjSEB
QgWgQHqPB4U/0Z9IKI7nc3hF+z6t26uWEqLShkyTSsMvKGcIPTNUQdnO14sQ5Htb
ToR7UBNtT7P9cbupGYwIP9Yz/IGhkmoiSo0WyzmCeew8OZB3tCnrUOgOZ65qrPsK
F/lYiNRd4aevQ46wxcDPla4=
-----END PRIVATE KEY-----
"""

def write_test_cert(folder):
    """Write TEST_CERT_PEM and TEST_KEY_PEM into `folder`; return (cert_path, key_path).

    A client trusts the fake by using cert_path as its CA file (e.g. `SSL_CERT_FILE=cert_path`).
    """
    cert_path = os.path.join(folder, "fake-okx-cert.pem")
    key_path = os.path.join(folder, "fake-okx-key.pem")
    for path, text in ((cert_path, TEST_CERT_PEM), (key_path, TEST_KEY_PEM)):
        with open(path, "w") as pem_file:
            pem_file.write(text)
    return cert_path, key_path


# A live-trading key and a demo-trading key (demo requests must carry `x-simulated-trading: 1`).
KEY, SECRET, PASSPHRASE = "6f1d3c2a-7b4e-4c1a-9e2f-0a1b2c3d4e5f", "3E0F7A9C1B2D4E6F8A0B1C2D3E4F5A6B", "Live-Pass-1"
DEMO_KEY, DEMO_SECRET, DEMO_PASSPHRASE = ("0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a", "A1B2C3D4E5F60718293A4B5C6D7E8F90",
                                          "Demo-Pass-1")
LIVE_BALANCES = {"USDT": "10000", "BTC": "0.5", "ETH": "3"}
DEMO_BALANCES = {"USDT": "100000", "BTC": "5", "ETH": "50"}

DAY_MS = 86400000
SIGN_WINDOW_MS = 30000              # OKX rejects a signature timestamp further than this from its clock
CANCELED_KEPT_MS = 2 * 3600000      # canceled orders without fills vanish from orders-history after 2 h
HISTORY_DAYS, ARCHIVE_DAYS = 7, 90  # reach of orders-history and orders-history-archive
CANDLES_REACH, HISTORY_CANDLES_REACH = 1440, 5000   # bars back from now served by each candle endpoint
CANDLES_FLOOR_MS = 1483228800000    # 2017-01-01: no candles before this
BOOK_LEVELS = 400
DEFAULT_LEVER = Decimal("10")
MMR_RATE = Decimal("0.004")         # maintenance margin rate used for mmr and liqPx

INST_TYPES = ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION")
ORDER_TYPES = ("limit", "market", "post_only", "ioc", "fok")
PENDING, FINISHED = ("live", "partially_filled"), ("filled", "canceled", "mmp_canceled")
ID_PATTERN = re.compile(r"^[A-Za-z0-9]{1,32}$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9]{1,16}$")
PLAIN_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")
TIMESTAMP_PATTERN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# Spot: instId, tickSz, lotSz, minSz, max lever, starting bid, ask
SPOT_SPECS = [
    ("BTC-USDT", "0.1", "0.00000001", "0.00001", "10", "43000.1", "43000.2"),
    ("ETH-USDT", "0.01", "0.000001", "0.001", "10", "2922.18", "2922.19"),
    ("LTC-USDT", "0.01", "0.000001", "0.001", "5", "70.12", "70.13"),
    ("ETH-BTC", "0.00001", "0.000001", "0.001", "5", "0.06795", "0.06796"),
]
# Contracts: underlying, ctType, ctVal, ctValCcy, settleCcy, tickSz, starting bid, ask
CONTRACT_SPECS = [
    ("BTC-USDT", "linear", "0.01", "BTC", "USDT", "0.1", "43010.5", "43010.6"),
    ("ETH-USDT", "linear", "0.1", "ETH", "USDT", "0.01", "2923.5", "2923.51"),
    ("BTC-USD", "inverse", "100", "USD", "BTC", "0.1", "43012.3", "43012.4"),
]
FUTURES_UNDERLYINGS = ("BTC-USD", "BTC-USDT")
FUTURES_PREMIUM = {"this_week": "20", "next_week": "45", "quarter": "180", "next_quarter": "400"}
SWAP_FUNDING_RATES = {"BTC-USDT-SWAP": "0.0001", "ETH-USDT-SWAP": "0.00008", "BTC-USD-SWAP": "-0.00002"}

# Candle sizes OKX accepts (case-sensitive): (unit, size, hours the open is shifted from UTC).
# Without the "utc" suffix, bars of 6 hours and more open on Hong Kong time (UTC+8).
CANDLE_BARS = {
    "1s": ("ms", 1000, 0), "1m": ("ms", 60000, 0), "3m": ("ms", 180000, 0), "5m": ("ms", 300000, 0),
    "15m": ("ms", 900000, 0), "30m": ("ms", 1800000, 0), "1H": ("ms", 3600000, 0), "2H": ("ms", 7200000, 0),
    "4H": ("ms", 14400000, 0), "6H": ("ms", 21600000, 8), "12H": ("ms", 43200000, 8), "1D": ("ms", DAY_MS, 8),
    "2D": ("ms", 2 * DAY_MS, 8), "3D": ("ms", 3 * DAY_MS, 8), "1W": ("week", 7 * DAY_MS, 8),
    "1M": ("month", 1, 8), "3M": ("month", 3, 8), "6Hutc": ("ms", 21600000, 0), "12Hutc": ("ms", 43200000, 0),
    "1Dutc": ("ms", DAY_MS, 0), "2Dutc": ("ms", 2 * DAY_MS, 0), "3Dutc": ("ms", 3 * DAY_MS, 0),
    "1Wutc": ("week", 7 * DAY_MS, 0), "1Mutc": ("month", 1, 0), "3Mutc": ("month", 3, 0),
}

# Canned answers of the faults that answer without processing: (HTTP status, Content-Type, body).
CANNED_FAULTS = {
    "http500": (500, "text/html", b"<html><head><title>500 Internal Server Error</title></head>"
                                  b"<body><h1>500 Internal Server Error</h1></body></html>"),
    "http502_empty": (502, "text/html", b""),
    "http503": (503, "application/json",
                b'{"code":"50001","msg":"Service temporarily unavailable. Please try again later.","data":[]}'),
    "garbage": (200, "application/json", b"{not json"),
    "ratelimit": (429, "application/json", b'{"code":"50011","msg":"Too Many Requests","data":[]}'),
}
FAULT_KINDS = tuple(CANNED_FAULTS) + ("timeout", "reset", "slow", "timeout_after_process", "reset_after_process",
                                      "truncated_after_process")


# -- small pure helpers ------------------------------------------------------------------------------------

def now_ms():
    return int(time.time() * 1000)


def fmt(value):
    """A Decimal as OKX writes it: plain notation without trailing zeros ("0.00001", "100", "-2.5")."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def rounded(value, places=12):
    """Cut a computed amount (a quotient, a weighted average) to a sensible number of decimals."""
    return value.quantize(Decimal(1).scaleb(-places))


def okx_timestamp(ms=None):
    """The OK-ACCESS-TIMESTAMP form of `ms` (default: now): `2020-12-08T09:08:57.715Z`."""
    ms = now_ms() if ms is None else ms
    moment = dt.datetime.fromtimestamp(ms // 1000, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


def sign_okx(secret, timestamp, method, request_path, body=""):
    """OK-ACCESS-SIGN: Base64(HMAC-SHA256(secret, timestamp + METHOD + path-with-query + body))."""
    prehash = timestamp + method.upper() + request_path + body
    return base64.b64encode(hmac.new(secret.encode(), prehash.encode(), hashlib.sha256).digest()).decode()


class OkxError(Exception):
    """An OKX error answer: `code` and `msg` of the envelope and the HTTP status OKX sends with it."""

    def __init__(self, code, msg, status=200):
        super().__init__(code, msg)
        self.code, self.msg, self.status = code, msg, status


def param_error(name):
    return OkxError("51000", "Parameter %s error" % name, 400)


def param_missing(name):
    return OkxError("50014", "Parameter %s can not be empty." % name, 400)


def text_param(params, name, required=True):
    """A string parameter; "" when absent. 50014 when required and empty, 51000 when not a string."""
    value = params.get(name, "")
    if not isinstance(value, str):
        raise param_error(name)
    if required and value == "":
        raise param_missing(name)
    return value


def decimal_param(params, name, required=True):
    """A positive amount sent as a plain decimal string ("0.001"; never a number, never "1e-05")."""
    text = text_param(params, name, required)
    if text == "":
        return None
    if not PLAIN_DECIMAL.match(text) or Decimal(text) <= 0:
        raise param_error(name)
    return Decimal(text)


def int_param(params, name, default, low, high):
    text = text_param(params, name, required=False)
    if text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise param_error(name)
    return int(text)


def ms_param(params, name):
    """An optional ms timestamp or ordId cursor: an int, or None."""
    text = text_param(params, name, required=False)
    if text and not text.isdigit():
        raise param_error(name)
    return int(text) if text else None


def page_by_ord_id(orders, params):
    """Newest first, cut by the `after`/`before` ordId cursors (exclusive) and `limit` (max 100)."""
    after, before = ms_param(params, "after"), ms_param(params, "before")
    limit = int_param(params, "limit", 100, 1, 100)
    rows = sorted(orders, key=lambda order: int(order["ordId"]), reverse=True)
    rows = [o for o in rows if (after is None or int(o["ordId"]) < after)
            and (before is None or int(o["ordId"]) > before)]
    return rows[:limit]


def public_order(order):
    """The OKX view of a stored order (the fake keeps its own bookkeeping in keys starting with "_")."""
    return {name: value for name, value in order.items() if not name.startswith("_")}


# -- instruments and market data ---------------------------------------------------------------------------

def make_instrument(inst_type, inst_id, tick, lot, min_sz, lever, base="", quote="", uly="", settle="",
                    ct_type="", ct_val="", ct_val_ccy="", alias="", exp_time="", list_time="1606468572000"):
    """One row of /public/instruments: every field OKX's v5 docs list, strings as OKX sends them."""
    spot = inst_type == "SPOT"
    return {
        "alias": alias, "auctionEndTime": "", "baseCcy": base, "category": "1", "ctMult": "" if spot else "1",
        "ctType": ct_type, "ctVal": ct_val, "ctValCcy": ct_val_ccy, "expTime": exp_time,
        "futureSettlement": False, "instFamily": uly, "instId": inst_id, "instType": inst_type, "lever": lever,
        "listTime": list_time, "lotSz": lot, "maxIcebergSz": "9999999999", "maxLmtAmt": "20000000",
        "maxLmtSz": "9999999999" if spot else "100000", "maxMktAmt": "1000000",
        "maxMktSz": "1000000" if spot else "5000", "maxStopSz": "" if spot else "5000",
        "maxTriggerSz": "9999999999" if spot else "100000", "maxTwapSz": "9999999999" if spot else "100000",
        "minSz": min_sz, "openType": "", "optType": "", "quoteCcy": quote, "ruleType": "normal",
        "settleCcy": settle, "state": "live", "stk": "", "tickSz": tick,
        "tradeQuoteCcyList": [quote] if spot else [], "uly": uly,
    }


def futures_expiries(now):
    """Expiry moments (Fridays 08:00 UTC) of the this_week, next_week, quarter and next_quarter contracts."""
    def friday_8am(day):
        return dt.datetime(day.year, day.month, day.day, 8, tzinfo=dt.timezone.utc)

    this_week = now.date() + dt.timedelta(days=(4 - now.weekday()) % 7)
    if friday_8am(this_week) <= now:
        this_week += dt.timedelta(days=7)
    next_week = this_week + dt.timedelta(days=7)
    quarters, year, month = [], now.year, (now.month - 1) // 3 * 3 + 3
    while len(quarters) < 2:
        first_of_next = dt.date(year + month // 12, month % 12 + 1, 1)
        last_friday = first_of_next - dt.timedelta(days=(first_of_next.weekday() - 4) % 7 or 7)
        if last_friday > next_week:
            quarters.append(last_friday)
        year, month = (year + 1, month - 9) if month == 12 else (year, month + 3)
    days = [this_week, next_week] + quarters
    return {alias: friday_8am(day) for alias, day in zip(FUTURES_PREMIUM, days)}


def build_instruments(at_ms):
    """All instruments of the fake, keyed by instId, with their starting (bid, ask)."""
    instruments, prices = {}, {}
    for inst_id, tick, lot, min_sz, lever, bid, ask in SPOT_SPECS:
        base, quote = inst_id.split("-")
        instruments[inst_id] = make_instrument("SPOT", inst_id, tick, lot, min_sz, lever, base=base, quote=quote)
        prices[inst_id] = (bid, ask)
    specs = {spec[0]: spec for spec in CONTRACT_SPECS}
    for uly, ct_type, ct_val, ct_val_ccy, settle, tick, bid, ask in CONTRACT_SPECS:
        inst_id = uly + "-SWAP"
        instruments[inst_id] = make_instrument("SWAP", inst_id, tick, "1", "1", "100", uly=uly, settle=settle,
                                               ct_type=ct_type, ct_val=ct_val, ct_val_ccy=ct_val_ccy,
                                               list_time="1573557408000")
        prices[inst_id] = (bid, ask)
    expiries = futures_expiries(dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc))
    for uly in FUTURES_UNDERLYINGS:
        _, ct_type, ct_val, ct_val_ccy, settle, tick, bid, ask = specs[uly]
        for alias, expiry in expiries.items():
            inst_id = uly + expiry.strftime("-%y%m%d")
            exp_ms = int(expiry.timestamp() * 1000)
            instruments[inst_id] = make_instrument(
                "FUTURES", inst_id, tick, "1", "1", "100", uly=uly, settle=settle, ct_type=ct_type, ct_val=ct_val,
                ct_val_ccy=ct_val_ccy, alias=alias, exp_time=str(exp_ms), list_time=str(exp_ms - 120 * DAY_MS))
            premium = Decimal(FUTURES_PREMIUM[alias])
            prices[inst_id] = (fmt(Decimal(bid) + premium), fmt(Decimal(ask) + premium))
    add_option_instruments(instruments, prices, at_ms)
    return instruments, prices


class BarGrid:
    """The bar-open times of one candle size: bar number n opens at open_ms(n); index(ts) holds ts."""

    def __init__(self, bar):
        self.unit, self.size, hours = CANDLE_BARS[bar]
        self.shift = hours * 3600000
        if self.unit == "week":           # weeks open on Monday; 1970-01-01 was a Thursday
            self.shift -= 4 * DAY_MS

    def index(self, ts):
        if self.unit != "month":
            return (ts + self.shift) // self.size
        local = dt.datetime.fromtimestamp((ts + self.shift) / 1000, dt.timezone.utc)
        return (local.year * 12 + local.month - 1) // self.size

    def open_ms(self, n):
        if self.unit != "month":
            return n * self.size - self.shift
        year, month = divmod(n * self.size, 12)
        return int(dt.datetime(year, month + 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000) - self.shift


def wave_price(base, tick, ts):
    """A deterministic price path: the same ts always gives the same price."""
    factor = 1 + 0.04 * math.sin(ts / 2.9e9) + 0.01 * math.sin(ts / 3.1e7) + 0.003 * math.sin(ts / 4.1e5)
    return (base * Decimal("%.9f" % factor)).quantize(tick)


# -- algo orders, amended orders, batches and options: helpers --------------------------------------------

ALGO_ORD_TYPES = ("conditional", "oco", "trigger")      # the algo order types the fake places
ALGO_LISTED_TYPES = ALGO_ORD_TYPES + ("move_order_stop", "chase", "twap", "iceberg", "smart_iceberg")
ALGO_PENDING = ("live", "pause", "partially_effective")
ALGO_HISTORY_STATES = ("effective", "canceled", "order_failed")     # orders-algo-history's `state` filter
ALGO_INST_TYPES = ("SPOT", "MARGIN", "SWAP", "FUTURES")             # the algo lists' `instType` filter
TRIGGER_PX_TYPES = ("last", "index", "mark")      # the fake compares all three with the last price
ALGO_CANCEL_MAX, BATCH_MAX = 10, 20
# A TP/SL trigger price on the wrong side of the last price, by the algo order's side and the leg.
WRONG_SIDE = {
    ("buy", "tp"): ("51277", "TP trigger price cannot be higher than the last price."),
    ("buy", "sl"): ("51278", "SL trigger price cannot be lower than the last price."),
    ("sell", "tp"): ("51279", "TP trigger price cannot be lower than the last price."),
    ("sell", "sl"): ("51280", "SL trigger price cannot be higher than the last price."),
}
# What cancelling or amending a finished or unknown order gets. OKX documents 51400 and 51503 for plain
# orders; that algo orders get the same codes is an assumption (UNCONFIRMED), kept here to change in one place.
ALGO_CANCEL_GONE = ("51400", "Order cancellation failed as the order has been filled, canceled or does not exist.")
ALGO_AMEND_GONE = ("51503", "Your order has already been filled or canceled.")
ORDER_AMEND_GONE = ("51503", "Your order has already been filled or canceled.")
AMEND_NOTHING = ("51500", "You must enter a price, quantity, or TP/SL")
# Fields only OKX's orders push carries, as an order without amendments shows them.
PUSH_DEFAULTS = {"amendResult": "", "reqId": "", "code": "0", "msg": ""}

# Options: family, settle coin, the spot instrument whose price is the index, ctMult, strike step, strikes
# listed whatever the price. One contract is ctVal x ctMult of the coin; prices are in the coin.
OPTION_FAMILIES = (
    ("BTC-USD", "BTC", "BTC-USDT", "0.01", 1000, (100000,)),
    ("ETH-USD", "ETH", "ETH-USDT", "0.1", 100, ()),
)
OPTION_TICK = Decimal("0.0001")     # OKX's tickSz of an option is the smallest of its tick bands
OPTION_VOL = 0.5                    # the volatility the starting option prices are computed with
FIXED_OPTION_EXPIRY = dt.datetime(2026, 12, 25, 8, tzinfo=dt.timezone.utc)   # tests use BTC-USD-261225-100000-C
YEAR_MS = 365 * DAY_MS


def either_missing(first, second):
    return OkxError("50015", "Either parameter %s or %s is required" % (first, second), 400)


def bool_param(params, name):
    """An optional JSON boolean (cxlOnFail, reduceOnly), default false."""
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise param_error(name)
    return value


def id_param(params, name):
    """An optional client id (algoClOrdId, reqId): up to 32 alphanumerics, "" when absent."""
    text = text_param(params, name, required=False)
    if text and not ID_PATTERN.match(text):
        raise param_error(name)
    return text


def price_param(params, name, tick, market_ok=False, required=True):
    """A positive price on the tick as a Decimal; Decimal(-1) for "-1" (market) when market_ok; None when
    absent and not required. "0" is an error: a leg priced 0 is not a leg."""
    text = text_param(params, name, required)
    if text == "":
        return None
    if market_ok and text == "-1":
        return Decimal(-1)
    if not PLAIN_DECIMAL.match(text) or Decimal(text) <= 0 or Decimal(text) % tick:
        raise param_error(name)
    return Decimal(text)


def page_by_id(rows, params, key):
    """page_by_ord_id for any numeric id field (algoId): newest first, after/before cursors, limit <= 100."""
    after, before = ms_param(params, "after"), ms_param(params, "before")
    limit = int_param(params, "limit", 100, 1, 100)
    rows = sorted(rows, key=lambda row: int(row[key]), reverse=True)
    rows = [row for row in rows if (after is None or int(row[key]) < after)
            and (before is None or int(row[key]) > before)]
    return rows[:limit]


def leg_waits_below(side, leg):
    """Whether a TP/SL leg waits below the last price: a buy's take-profit and a sell's stop-loss do."""
    return (side == "buy") == (leg == "tp")


def leg_fires(side, leg, last, trigger):
    return last <= trigger if leg_waits_below(side, leg) else last >= trigger


def leg_on_wrong_side(side, leg, last, trigger):
    """What 51277-51280 refuse: a leg that would already have fired (equal to the last price is accepted)."""
    return trigger > last if leg_waits_below(side, leg) else trigger < last


def bulk_code(rows):
    """Top-level code and msg of a batch answer: "0" all succeeded, "1" all failed, "2" some did."""
    failed = sum(1 for row in rows if row["sCode"] != "0")
    if not failed:
        return "0", ""
    return ("1", "All operations failed") if failed == len(rows) else ("2", "Bulk operation partially succeeded.")


def option_expiries(now):
    """Option expiries (08:00 UTC) listed at `now`: the next Friday, the last Friday of next month, and
    25 Dec 2026 while it is ahead."""
    friday = now.date() + dt.timedelta(days=(4 - now.weekday()) % 7)
    next_friday = dt.datetime(friday.year, friday.month, friday.day, 8, tzinfo=dt.timezone.utc)
    if next_friday <= now:
        next_friday += dt.timedelta(days=7)
    month = now.month % 12 + 1                              # next month, 1..12
    year = now.year + (1 if month == 1 else 0)
    first_after = dt.date(year + month // 12, month % 12 + 1, 1)     # the first day of the month after it
    last = first_after - dt.timedelta(days=(first_after.weekday() - 4) % 7 or 7)
    expiries = {next_friday, dt.datetime(last.year, last.month, last.day, 8, tzinfo=dt.timezone.utc)}
    if FIXED_OPTION_EXPIRY > now:
        expiries.add(FIXED_OPTION_EXPIRY)
    return sorted(expiries)


def option_premium(spot, strike, years, call, vol=OPTION_VOL):
    """Black-Scholes value (no rates) of an option on one coin, in the coin, as OKX quotes options."""
    intrinsic = max(0.0, spot - strike) if call else max(0.0, strike - spot)
    if years <= 0:
        return intrinsic / spot

    def normal_cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    spread = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + spread * spread / 2) / spread
    d2 = d1 - spread
    if call:
        usd = spot * normal_cdf(d1) - strike * normal_cdf(d2)
    else:
        usd = strike * normal_cdf(-d2) - spot * normal_cdf(-d1)
    return max(usd, intrinsic) / spot


def add_option_instruments(instruments, prices, at_ms):
    """The OPTION instruments of OPTION_FAMILIES (instId FAMILY-YYMMDD-STRIKE-C|P) and their starting
    (bid, ask): five strikes around the index price plus the fixed ones, calls and puts, every expiry."""
    now = dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc)
    for family, coin, index_id, ct_mult, step, fixed_strikes in OPTION_FAMILIES:
        spot = (Decimal(prices[index_id][0]) + Decimal(prices[index_id][1])) / 2
        centre = int(spot / step + Decimal("0.5")) * step
        strikes = sorted(set(range(centre - 2 * step, centre + 3 * step, step)) | set(fixed_strikes))
        for expiry in option_expiries(now):
            exp_ms = int(expiry.timestamp() * 1000)
            for strike in strikes:
                for opt_type in ("C", "P"):
                    inst_id = "%s-%s-%d-%s" % (family, expiry.strftime("%y%m%d"), strike, opt_type)
                    inst = make_instrument("OPTION", inst_id, fmt(OPTION_TICK), "1", "1", "", uly=family,
                                           settle=coin, ct_val="1", ct_val_ccy=coin, exp_time=str(exp_ms),
                                           list_time=str(min(at_ms, exp_ms) - 30 * DAY_MS))
                    inst.update(ctMult=ct_mult, optType=opt_type, stk=str(strike), maxLmtSz="10000",
                                maxMktSz="", maxStopSz="", maxTriggerSz="", maxTwapSz="", maxIcebergSz="")
                    instruments[inst_id] = inst
                    value = option_premium(float(spot), float(strike), (exp_ms - at_ms) / YEAR_MS, opt_type == "C")
                    premium = Decimal("%.8f" % value)
                    bid = max(OPTION_TICK, (premium * Decimal("0.98")).quantize(OPTION_TICK, ROUND_DOWN))
                    ask = bid + max(OPTION_TICK, (premium * Decimal("0.04")).quantize(OPTION_TICK, ROUND_DOWN))
                    prices[inst_id] = (fmt(bid), fmt(ask))


# -- accounts -----------------------------------------------------------------------------------------------

def new_account(secret, passphrase, demo, uid, balances):
    """One API key's account. Amounts are Decimals; orders and positions use OKX's field names."""
    return {
        "secret": secret, "passphrase": passphrase, "demo": demo, "uid": uid,
        "pos_mode": "net_mode",       # or "long_short_mode"
        "acct_lv": "2",               # "1" spot mode (availEq "", no derivatives), "2" futures mode
        "balances": {ccy: [Decimal(amount), Decimal(0)] for ccy, amount in balances.items()},  # [avail, frozen]
        "orders": {},                 # ordId -> order (OKX fields + "_reserve", "_target")
        "positions": {},              # (instId, mgnMode, posSide) -> position with Decimal pos/avgPx/margin
        "leverage": {},               # (instId, mgnMode, posSide) -> Decimal lever
    }


Call = namedtuple("Call", "params account headers")

# The fake's endpoints. limit/window/per: the rate limit in OKX's v5 docs, counted per client IP ("ip"), per IP
# and a parameter ("ip+instType"), per API key ("key") or per key and instrument ("key+instId").
Route = namedtuple("Route", "handler signed limit window per")
ROUTES = {
    ("GET", "/api/v5/public/time"): Route("public_time", False, 10, 2, "ip"),
    ("GET", "/api/v5/public/instruments"): Route("instruments", False, 20, 2, "ip+instType"),
    ("GET", "/api/v5/public/funding-rate"): Route("funding_rate", False, 10, 2, "ip+instId"),
    ("GET", "/api/v5/market/ticker"): Route("ticker", False, 20, 2, "ip"),
    ("GET", "/api/v5/market/tickers"): Route("tickers", False, 20, 2, "ip"),
    ("GET", "/api/v5/market/books"): Route("books", False, 40, 2, "ip"),
    ("GET", "/api/v5/market/trades"): Route("trades", False, 100, 2, "ip"),
    ("GET", "/api/v5/market/candles"): Route("candles", False, 40, 2, "ip"),
    ("GET", "/api/v5/market/history-candles"): Route("history_candles", False, 20, 2, "ip"),
    ("GET", "/api/v5/account/balance"): Route("balance", True, 10, 2, "key"),
    ("GET", "/api/v5/account/config"): Route("config", True, 5, 2, "key"),
    ("GET", "/api/v5/account/positions"): Route("positions", True, 10, 2, "key"),
    ("POST", "/api/v5/account/set-leverage"): Route("set_leverage", True, 20, 2, "key"),
    ("GET", "/api/v5/account/leverage-info"): Route("leverage_info", True, 20, 2, "key"),
    ("POST", "/api/v5/account/set-position-mode"): Route("set_position_mode", True, 5, 2, "key"),
    ("POST", "/api/v5/trade/order"): Route("place_order", True, 60, 2, "key+instId"),
    ("GET", "/api/v5/trade/order"): Route("get_order", True, 60, 2, "key+instId"),
    ("POST", "/api/v5/trade/cancel-order"): Route("cancel_order", True, 60, 2, "key+instId"),
    ("GET", "/api/v5/trade/orders-pending"): Route("orders_pending", True, 60, 2, "key"),
    ("GET", "/api/v5/trade/orders-history"): Route("orders_history", True, 40, 2, "key"),
    ("GET", "/api/v5/trade/orders-history-archive"): Route("orders_history_archive", True, 20, 2, "key"),
    ("POST", "/api/v5/trade/order-algo"): Route("place_algo", True, 20, 2, "key+instId"),
    ("POST", "/api/v5/trade/amend-algos"): Route("amend_algos", True, 20, 2, "key+instId"),
    ("POST", "/api/v5/trade/cancel-algos"): Route("cancel_algos", True, 20, 2, "key"),
    ("GET", "/api/v5/trade/order-algo"): Route("get_algo", True, 20, 2, "key"),
    ("GET", "/api/v5/trade/orders-algo-pending"): Route("algos_pending", True, 20, 2, "key"),
    ("GET", "/api/v5/trade/orders-algo-history"): Route("algos_history", True, 20, 2, "key"),
    ("POST", "/api/v5/trade/amend-order"): Route("amend_order", True, 60, 2, "key+instId"),
    ("POST", "/api/v5/trade/batch-orders"): Route("batch_orders", True, 300, 2, "key"),
    ("POST", "/api/v5/trade/cancel-batch-orders"): Route("cancel_batch_orders", True, 300, 2, "key"),
}
KNOWN_PATHS = {path for _, path in ROUTES}
# POST endpoints whose body is a JSON array of objects, not an object (batch limits count requests here,
# where OKX counts the orders in them: 300 orders / 2 s).
ARRAY_BODY_PATHS = {"/api/v5/trade/cancel-algos", "/api/v5/trade/batch-orders", "/api/v5/trade/cancel-batch-orders"}


# -- the exchange -------------------------------------------------------------------------------------------

class _BackgroundServer:
    """Start and stop plumbing of the fakes: a socketserver served from a daemon thread, usable as a
    context manager; `stop()` also drops every connection still open (`_sockets`, under `_lock`)."""

    _server = None

    def _serve(self, server):
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.002}, daemon=True).start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        _drop_sockets(self._lock, self._sockets)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# -- account events: what FakeOKX tells its observers (the private WebSocket) ---------------------------
#
# `FakeOKX.observers` is a list of callables `observer(api_key, kind, rows)`, called under the fake's lock
# once an account has changed. One change (a placement with its fills, a cancel, a helper call) reports,
# in this order and only what it changed:
#   "orders"     one row per order event, shaped as an `orders` push (OKX's v5 docs): the REST row plus
#                fillPx/fillSz/tradeId/fillTime/fillFee/fillFeeCcy/execType of THIS update's fill only
#                (""/"0" when it is no fill), avgPx "0" while nothing filled, amendResult, reqId, code, msg;
#                a taker order gives its accepted ("live") row, then its fill;
#   "account"    [the GET /account/balance data[0] object, its `details` cut to the changed currencies];
#   "positions"  the changed /account/positions rows; a position that closed comes once with pos "0".
# The methods that change an account carry `@account_change(...)`: the outermost call opens the change
# (noting balances and positions), and its return compares and reports. Order events come from
# `_order_event()`: `_place`, `_fill` and `_cancel` report through their decorator, so any new path that
# goes through them (an algo order that triggers and calls `_place`) pushes by itself. A new path that
# changes an order otherwise (amend) decorates its method with `@account_change()` and calls
# `self._order_event(account, order, amendResult="0", reqId=req_id)`. Without observers it all costs nothing.

_ORDER_PUSH_DEFAULTS = {"amendResult": "", "amendSource": "", "reqId": "", "code": "0", "msg": ""}
_NO_FILL = {"fillPx": "", "fillSz": "0", "tradeId": "", "fillTime": "", "fillFee": "0", "fillFeeCcy": "",
            "execType": ""}


def account_change(event=None):
    """Decorate a FakeOKX method that changes an account, found as its `account` argument, `call.account`
    or the account of its `key` argument (default KEY). `event`: "place" (the method returns the new
    order), "fill" / "cancel" (of its `order` argument), or None (balances and positions only)."""
    def decorate(method):
        code = method.__code__
        names = code.co_varnames[1:code.co_argcount]

        def wrapper(self, *args, **kwargs):
            if not self.observers:
                return method(self, *args, **kwargs)
            arguments = dict(zip(names, args), **kwargs)
            if isinstance(arguments.get("account"), dict):
                account = arguments["account"]
            elif isinstance(arguments.get("call"), Call):
                account = arguments["call"].account
            else:
                account = self.accounts[arguments.get("key", KEY)]
            with self._lock:
                change = self._open_change(account)
                try:
                    order = arguments.get("order")
                    if event in ("fill", "cancel"):
                        self._announce(change, account, order)
                        fee_before = Decimal(order["fee"])
                    result = method(self, *args, **kwargs)
                    if event == "place":
                        self._announce(change, account, result)
                    elif event == "fill":
                        self._order_event(account, order, fill_fee=Decimal(order["fee"]) - fee_before,
                                          exec_type="T" if order["ordId"] in change["new_orders"] else "M")
                    elif event == "cancel":
                        self._order_event(account, order)
                    return result
                finally:
                    self._close_change(account)

        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
        wrapper.__wrapped__ = method
        return wrapper
    return decorate


class _AccountEvents:
    """The change bookkeeping behind `account_change` (mixed into FakeOKX; see the banner above)."""

    def _api_key_of(self, account):
        return next(key for key, known in self.accounts.items() if known is account)

    def _balance_rows(self, account):
        """{ccy: detail row of GET /account/balance, without its uTime} as it is now."""
        details = self._api_balance(Call({}, account, {}))[0]["details"]
        return {row["ccy"]: dict(row, uTime="") for row in details}

    def _position_state(self, account):
        """{(instId, mgnMode, posSide): (the stored position, its REST row now)}."""
        return {key: (position, self._position_row(account, position))
                for key, position in account["positions"].items()}

    def _open_change(self, account):
        key = self._api_key_of(account)
        change = self._changes.get(key)
        if change is None:
            change = self._changes[key] = {
                "depth": 0, "orders": [], "old_orders": set(account["orders"]), "new_orders": set(),
                "balances": self._balance_rows(account), "positions": self._position_state(account)}
        change["depth"] += 1
        return change

    def _close_change(self, account):
        key = self._api_key_of(account)
        change = self._changes[key]
        change["depth"] -= 1
        if change["depth"] == 0:
            del self._changes[key]
            self._report_change(key, account, change)

    def _announce(self, change, account, order):
        """The accepted push of an order placed in this change, once, before anything else happens to it."""
        ord_id = order["ordId"]
        if ord_id not in change["old_orders"] and ord_id not in change["new_orders"]:
            change["new_orders"].add(ord_id)
            self._order_event(account, order)

    def _order_event(self, account, order, fill_fee=None, exec_type="", **fields):
        """Report one order event: `order` (stored or REST row) as it is now; `fill_fee` (a Decimal, OKX's
        sign: negative is a charge) when this update is a fill of fillSz at fillPx; `fields` override
        push fields (amendResult, reqId, code, msg, ...)."""
        if not self.observers:
            return
        row = public_order(order)
        for name, value in _ORDER_PUSH_DEFAULTS.items():
            row.setdefault(name, value)
        if not Decimal(row.get("accFillSz") or 0):
            row["avgPx"] = "0"
        if fill_fee is None:
            row.update(_NO_FILL)
        else:
            row.update(fillFee=fmt(fill_fee), fillFeeCcy=row.get("feeCcy", ""), execType=exec_type)
        row.update(fields)
        with self._lock:
            self._open_change(account)["orders"].append(row)
            self._close_change(account)

    def _report_change(self, api_key, account, change):
        data = self._api_balance(Call({}, account, {}))[0]
        after = {row["ccy"]: row for row in data["details"]}
        before = change["balances"]
        details = []
        for ccy in sorted(set(before) | set(after)):
            if ccy not in after:                    # emptied: no longer listed by REST, pushed once as zero
                details.append(dict(before[ccy], eq="0", cashBal="0", availBal="0", frozenBal="0", ordFrozen="0",
                                    availEq="" if account["acct_lv"] == "1" else "0", eqUsd="0", disEq="0",
                                    upl="0", uTime=data["uTime"]))
            elif dict(after[ccy], uTime="") != before.get(ccy):
                details.append(after[ccy])
        positions_before, positions = change["positions"], []
        for key, (position, row) in self._position_state(account).items():
            if key not in positions_before or positions_before[key][1] != row:
                positions.append(row)
        for key, (position, _) in positions_before.items():
            if key not in account["positions"]:
                positions.append(dict(self._position_row(account, position), pos="0"))
        reports = (("orders", change["orders"]), ("account", [dict(data, details=details)] if details else []),
                   ("positions", positions))
        for kind, rows in reports:
            for observer in list(self.observers) if rows else ():
                try:
                    observer(api_key, kind, rows)
                except Exception:          # a bug of an observer: show it, never break the REST answer
                    traceback.print_exc()


class FakeOKX(_AccountEvents, _BackgroundServer):
    """A fake OKX v5 REST exchange on 127.0.0.1, run by a ThreadingHTTPServer in a background thread.

        with FakeOKX(tls=True) as fake:          # or fake = FakeOKX().start(); ...; fake.stop()
            fake.base_url, fake.cert_path        # "https://127.0.0.1:N", a CA file that trusts it

    Accounts: `KEY` (live, net mode, futures account level "2") and `DEMO_KEY` (demo trading). Answers
    are OKX's envelope `{"code","msg","data"}` with every number a string; errors carry OKX's code and
    the HTTP status OKX's v5 docs give. Everything below is guarded by one lock, so tests may change the fake
    while the plugin is talking to it. Orders rest until a cross of the book at placement or `fill()`:
    moving the price with `set_price()` fills nothing by itself, but fires the algo orders it triggers.
    Also: algo orders, amend-order, batch endpoints and OPTION instruments (sections below).
    """

    def __init__(self, tls=False, latency_ms=0, handshake_ms=0, clock=None):
        self.tls = tls
        self.clock = REAL_CLOCK if clock is None else clock   # true_time() and monotonic() of the exchange
        self.observers = []                 # observer(api_key, kind, rows) after each account change
        self._changes = {}                  # api key -> the change being made (see account_change)
        self.latency_ms = latency_ms        # slept before every answer (simulated round trip)
        self.handshake_ms = handshake_ms    # slept once per new connection (TCP + TLS set-up)
        self.clock_skew_ms = 0              # the exchange's "now" is the clock's true time plus this
        self.enforce_rate_limits = False    # count requests in OKX's windows and answer 429 / 50011 past them
        self.rate_limited = 0               # 50011 answers sent (including the "ratelimit" fault)
        self.fee_rate = Decimal("0.001")    # taker fee on every fill, charged in what is received / settle ccy
        self.requests = []                  # {method, path, query, headers, body} of every request
        self.connections = 0                # connections accepted
        self.cert_path = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._faults = []
        self._rate_windows = {}
        self._sockets = set()
        self._server = None
        self._seq = 0
        self._instruments, prices = build_instruments(self.now_ms())
        self._market = {}
        for inst_id, (bid, ask) in prices.items():
            self._market[inst_id] = {"bid": Decimal(bid), "ask": Decimal(ask), "last": Decimal(bid),
                                     "base": Decimal(bid), "seq": 1000}
        next_funding = (self.now_ms() // (8 * 3600000) + 1) * 8 * 3600000
        self._funding = {inst_id: (Decimal(rate), next_funding, next_funding + 8 * 3600000)
                         for inst_id, rate in SWAP_FUNDING_RATES.items()}
        self.accounts = {
            KEY: new_account(SECRET, PASSPHRASE, False, "44705892343619584", LIVE_BALANCES),
            DEMO_KEY: new_account(DEMO_SECRET, DEMO_PASSPHRASE, True, "55816903454720695", DEMO_BALANCES),
        }

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self):
        """Listen on a free port of 127.0.0.1 and serve in a daemon thread; returns self."""
        self._server = _FakeOKXServer(("127.0.0.1", 0), _FakeOKXHandler)
        self._server.fake = self
        if self.tls:
            self.cert_path, key_path = write_test_cert(tempfile.mkdtemp(prefix="fake-okx-"))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert_path, key_path)
            self._server.ssl_context = context
        return self._serve(self._server)

    def stop(self):
        """Stop listening and drop every open connection (hanging faults end at once)."""
        self._stopping.set()
        super().stop()

    @property
    def base_url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self._server.server_address[1])

    def now_ms(self):
        """The exchange's clock: the clock's true time plus clock_skew_ms."""
        return int(self.clock.true_time() * 1000) + self.clock_skew_ms

    def now_us(self):
        """now_ms() in microseconds (inTime/outTime of trade answers)."""
        return int(self.clock.true_time() * 1000000) + self.clock_skew_ms * 1000

    # -- test helpers -----------------------------------------------------------------------------------

    def clear_requests(self):
        with self._lock:
            del self.requests[:]

    def fault(self, path_prefix, kind, count=1):
        """Give the next `count` requests whose path starts with `path_prefix` the fault `kind`:
        timeout, reset, http500, http502_empty, http503, garbage, ratelimit, slow, timeout_after_process,
        reset_after_process or truncated_after_process (see _FakeOKXHandler)."""
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r" % kind)
        with self._lock:
            self._faults.append({"prefix": path_prefix, "kind": kind, "count": count})

    def clear_faults(self):
        with self._lock:
            del self._faults[:]

    @account_change()
    def set_position_mode(self, mode, key=KEY):
        assert mode in ("net_mode", "long_short_mode"), mode
        with self._lock:
            self.accounts[key]["pos_mode"] = mode

    @account_change()
    def set_account_level(self, acct_lv, key=KEY):
        """"1" spot mode (no derivatives, availEq ""), "2" futures mode."""
        with self._lock:
            self.accounts[key]["acct_lv"] = acct_lv

    @account_change()
    def set_balance(self, ccy, avail, frozen="0", key=KEY):
        with self._lock:
            self.accounts[key]["balances"][ccy] = [Decimal(avail), Decimal(frozen)]

    def balance(self, ccy, key=KEY):
        """(avail, frozen) Decimals of one currency."""
        with self._lock:
            return tuple(self.accounts[key]["balances"].get(ccy, [Decimal(0), Decimal(0)]))

    def orders(self, key=KEY):
        """Every order of the account (OKX fields, newest first), whatever its state or age."""
        with self._lock:
            orders = sorted(self.accounts[key]["orders"].values(), key=lambda o: int(o["ordId"]), reverse=True)
            return [public_order(order) for order in orders]

    def positions(self, key=KEY):
        """The account's open positions as /account/positions rows."""
        with self._lock:
            account = self.accounts[key]
            return [self._position_row(account, p) for p in account["positions"].values()]

    def set_price(self, inst_id, bid, ask, last=None):
        """Move the book and the ticker of an instrument (last defaults to bid); the algo orders whose trigger
        the new last price reaches fire (trigger_check)."""
        with self._lock:
            market = self._market[inst_id]
            market.update(bid=Decimal(bid), ask=Decimal(ask), last=Decimal(last if last is not None else bid))
            market["seq"] += 7
            self.trigger_check(inst_id)

    @account_change()
    def fill(self, ord_id, sz=None, px=None, key=KEY):
        """Fill a pending order fully (sz None) or by `sz`, at `px` (default: the order's price)."""
        with self._lock:
            account = self.accounts[key]
            order = account["orders"][ord_id]
            if order["state"] not in PENDING:
                raise ValueError("order %s is %s" % (ord_id, order["state"]))
            remaining = order["_target"] - Decimal(order["accFillSz"])
            qty = remaining if sz is None else Decimal(sz)
            if not 0 < qty <= remaining:
                raise ValueError("fill size %s out of (0, %s]" % (qty, remaining))
            self._fill(account, order, qty, Decimal(px if px is not None else order["px"]))
            return public_order(order)

    def add_history_order(self, inst_id="BTC-USDT", side="buy", sz="0.01", px="40000", ord_type="limit",
                          age_days=1, state="filled", acc_fill_sz=None, cl_ord_id="", key=KEY):
        """Store a finished order placed `age_days` ago (a float: 0.05 is 72 minutes) without touching
        balances; acc_fill_sz defaults to sz when filled, else "0". Returns its ordId."""
        with self._lock:
            inst = self._instruments[inst_id]
            ctime = self.now_ms() - int(age_days * DAY_MS)
            filled = Decimal(acc_fill_sz if acc_fill_sz is not None else (sz if state == "filled" else "0"))
            order = self._new_order_row(self.accounts[key], inst, ctime, cl_ord_id, "", side, ord_type,
                                        Decimal(sz), Decimal(px) if ord_type != "market" else None,
                                        "cash" if inst["instType"] == "SPOT" else "cross", "net", "", False)
            order.update(state=state, uTime=str(ctime + 1000), accFillSz=fmt(filled))
            if filled:
                order.update(avgPx=px, fillPx=px, fillSz=fmt(filled), fillTime=str(ctime + 1000),
                             tradeId=self._next_id(900000000))
            self.accounts[key]["orders"][order["ordId"]] = order
            return order["ordId"]

    def set_funding(self, inst_id, rate, funding_time_ms, next_funding_time_ms):
        with self._lock:
            self._funding[inst_id] = (Decimal(rate), int(funding_time_ms), int(next_funding_time_ms))

    # -- dispatch -----------------------------------------------------------------------------------------

    def _take_fault(self, path):
        with self._lock:
            for fault in self._faults:
                if fault["count"] > 0 and path.startswith(fault["prefix"]):
                    fault["count"] -= 1
                    if fault["kind"] == "ratelimit":
                        self.rate_limited += 1
                    return fault["kind"]
        return None

    def _dispatch(self, method, target, headers, body, client_ip):
        """Answer one request: (HTTP status, JSON-able body)."""
        path, _, query = target.partition("?")
        route = ROUTES.get((method, path))
        if route is None:
            if path in KNOWN_PATHS:
                return 405, {"code": "50115", "msg": "Invalid request method.", "data": []}
            return 404, {"msg": "Not Found", "code": "404"}
        try:
            with self._lock:
                params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
                self._count_request(route, method, path, params, headers, body, client_ip)
                account = self._authenticate(method, target, headers, body) if route.signed else None
                if method == "POST":
                    params = self._post_params(headers, body, path in ARRAY_BODY_PATHS)
                answer = getattr(self, "_api_" + route.handler)(Call(params, account, headers))
            return 200, answer if isinstance(answer, dict) else {"code": "0", "msg": "", "data": answer}
        except OkxError as error:
            return error.status, {"code": error.code, "msg": error.msg, "data": []}
        except Exception:                  # a bug of the fake: show it, and answer as OKX's own failures do
            traceback.print_exc()
            return 500, {"code": "50026", "msg": "System error. Try again later", "data": []}

    def _count_request(self, route, method, path, params, headers, body, client_ip):
        if not self.enforce_rate_limits:
            return
        if method == "POST":
            try:
                params = json.loads(body)
            except ValueError:
                params = {}
            params = params if isinstance(params, dict) else {}
        who = headers.get("OK-ACCESS-KEY", "") if route.per.startswith("key") else client_ip
        extra = route.per.partition("+")[2]
        bucket = (method, path, who, str(params.get(extra, "")) if extra else "")
        stamps = self._rate_windows.setdefault(bucket, deque())
        moment = self.clock.monotonic()
        while stamps and stamps[0] <= moment - route.window:
            stamps.popleft()
        if len(stamps) >= route.limit:
            self.rate_limited += 1
            raise OkxError("50011", "Too Many Requests", 429)
        stamps.append(moment)

    def _authenticate(self, method, target, headers, body):
        """Check OKX's signature rules; return the account of the key or raise the error OKX gives."""
        for name, code in (("OK-ACCESS-KEY", "50103"), ("OK-ACCESS-PASSPHRASE", "50104"),
                           ("OK-ACCESS-SIGN", "50106"), ("OK-ACCESS-TIMESTAMP", "50107")):
            if not headers.get(name):
                raise OkxError(code, 'Request header "%s" cannot be empty.' % name, 401)
        stamp = headers["OK-ACCESS-TIMESTAMP"]
        try:
            if not TIMESTAMP_PATTERN.match(stamp):
                raise ValueError(stamp)
            moment = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise OkxError("50112", "Invalid OK-ACCESS-TIMESTAMP.", 401)
        account = self.accounts.get(headers["OK-ACCESS-KEY"])
        if account is None:
            raise OkxError("50111", "Invalid OK-ACCESS-KEY.", 401)
        if headers["OK-ACCESS-PASSPHRASE"] != account["passphrase"]:
            raise OkxError("50105", 'Request header "OK-ACCESS-PASSPHRASE" incorrect.', 401)
        if (headers.get("x-simulated-trading") == "1") != account["demo"]:
            raise OkxError("50101", "APIKey does not match current environment.", 401)
        if abs(moment.timestamp() * 1000 - self.now_ms()) > SIGN_WINDOW_MS:
            raise OkxError("50102", "Timestamp request expired", 401)
        expected = sign_okx(account["secret"], stamp, method, target, body)
        if not hmac.compare_digest(expected, headers["OK-ACCESS-SIGN"]):
            raise OkxError("50113", "Invalid Sign", 401)
        return account

    @staticmethod
    def _post_params(headers, body, array=False):
        """The JSON object of a POST body, or with `array` its JSON array of objects."""
        if headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise OkxError("50006", 'Invalid Content-Type, please use "application/json" format.', 400)
        if not body:
            raise OkxError("50000", "Body for POST request cannot be empty.", 400)
        try:
            params = json.loads(body)
        except ValueError:
            params = None
        if array and isinstance(params, list) and all(isinstance(item, dict) for item in params):
            return params
        if array or not isinstance(params, dict):
            raise OkxError("50002", "Json data format error.", 400)
        return params

    # -- shared pieces ------------------------------------------------------------------------------------

    def _next_id(self, base):
        self._seq += 1
        return str(base + self._seq)

    def _instrument(self, inst_id):
        inst = self._instruments.get(inst_id)
        if inst is None:
            raise OkxError("51001", "Instrument ID, Instrument ID code or Spread ID doesn't exist.")
        return inst

    def _inst_type_param(self, params, required=True, allowed=INST_TYPES):
        inst_type = text_param(params, "instType", required)
        if inst_type and inst_type not in allowed:
            raise param_error("instType")
        return inst_type

    @staticmethod
    def _contract_size(inst):
        return Decimal(inst["ctVal"]) * Decimal(inst["ctMult"])

    def _notional(self, inst, qty, price):
        """Value of `qty` contracts in the settle currency (USDT for linear, the coin for inverse)."""
        if inst["ctType"] == "inverse":
            return rounded(qty * self._contract_size(inst) / price)
        return qty * self._contract_size(inst) * price

    def _pnl(self, inst, long, entry, exit_px, qty):
        if inst["ctType"] == "inverse":
            gain = rounded(qty * self._contract_size(inst) * (1 / entry - 1 / exit_px))
        else:
            gain = (exit_px - entry) * qty * self._contract_size(inst)
        return gain if long else -gain

    def _usd_price(self, ccy):
        if ccy in ("USDT", "USD"):
            return Decimal(1)
        market = self._market.get(ccy + "-USDT")
        return market["last"] if market else Decimal(0)

    # -- public market data ----------------------------------------------------------------------------------

    def _api_public_time(self, call):
        return [{"ts": str(self.now_ms())}]

    def _api_instruments(self, call):
        inst_type = self._inst_type_param(call.params)
        inst_id = text_param(call.params, "instId", required=False)
        family = text_param(call.params, "instFamily", required=False) or text_param(call.params, "uly", False)
        if inst_type == "OPTION" and not family:
            raise param_missing("instFamily")
        if inst_id:
            inst = self._instrument(inst_id)
            rows = [inst] if inst["instType"] == inst_type else []
        else:
            rows = [inst for inst in self._instruments.values() if inst["instType"] == inst_type]
        return [dict(inst) for inst in rows if not family or inst["instFamily"] == family]

    def _book_side(self, inst, side, depth):
        """`depth` levels of one side, generated from the best price: asks ascending, bids descending."""
        tick, unit = Decimal(inst["tickSz"]), Decimal(inst["minSz"])
        if inst["instType"] == "SPOT":
            unit *= 50
        best = self._market[inst["instId"]][side]
        step = tick if side == "ask" else -tick
        return [[fmt(best + step * level), fmt(unit * (1 + (level * 7 + 3) % 11)), "0", str(1 + level % 5)]
                for level in range(depth) if best + step * level > 0]

    def _ticker_row(self, inst):
        market, spot = self._market[inst["instId"]], inst["instType"] == "SPOT"
        tick, base, last = Decimal(inst["tickSz"]), market["base"], market["last"]
        vol = Decimal("10474.12353007") if spot else Decimal("2317451")
        if spot:
            vol_ccy = vol * last
        elif inst["ctType"] == "inverse":
            vol_ccy = vol * self._contract_size(inst) / last
        else:
            vol_ccy = vol * self._contract_size(inst)
        ask_row, bid_row = self._book_side(inst, "ask", 1)[0], self._book_side(inst, "bid", 1)[0]
        return {
            "instType": inst["instType"], "instId": inst["instId"], "last": fmt(last),
            "lastSz": fmt(Decimal(inst["minSz"]) * 49) if spot else "3",
            "askPx": ask_row[0], "askSz": ask_row[1], "bidPx": bid_row[0], "bidSz": bid_row[1],
            "open24h": fmt((base * Decimal("0.98")).quantize(tick)),
            "high24h": fmt(max(market["ask"], (base * Decimal("1.02")).quantize(tick))),
            "low24h": fmt(min(market["bid"], (base * Decimal("0.97")).quantize(tick))),
            "volCcy24h": fmt(rounded(vol_ccy, 9)), "vol24h": fmt(vol),
            "ts": str(self.now_ms()), "sodUtc0": fmt((base * Decimal("0.99")).quantize(tick)),
            "sodUtc8": fmt((base * Decimal("1.01")).quantize(tick)),
        }

    def _api_ticker(self, call):
        return [self._ticker_row(self._instrument(text_param(call.params, "instId")))]

    def _api_tickers(self, call):
        inst_type = self._inst_type_param(call.params, allowed=("SPOT", "SWAP", "FUTURES", "OPTION"))
        family = text_param(call.params, "instFamily", required=False) or text_param(call.params, "uly", False)
        if inst_type == "OPTION" and not family:
            raise param_missing("instFamily")
        return [self._ticker_row(inst) for inst in self._instruments.values()
                if inst["instType"] == inst_type and (not family or inst["instFamily"] == family)]

    def _api_books(self, call):
        inst = self._instrument(text_param(call.params, "instId"))
        depth = int_param(call.params, "sz", 1, 1, BOOK_LEVELS)
        return [{"asks": self._book_side(inst, "ask", depth), "bids": self._book_side(inst, "bid", depth),
                 "ts": str(self.now_ms()), "seqId": self._market[inst["instId"]]["seq"]}]

    def _api_trades(self, call):
        """The last trades, one a second, newest first; tradeId is the second they happened in."""
        inst = self._instrument(text_param(call.params, "instId"))
        limit = int_param(call.params, "limit", 100, 1, 500)
        market, unit = self._market[inst["instId"]], Decimal(inst["minSz"])
        newest = self.now_ms() // 1000
        rows = []
        for second in range(newest, newest - limit, -1):
            side = "sell" if second % 3 == 0 else "buy"
            rows.append({"instId": inst["instId"], "tradeId": str(second),
                         "px": fmt(market["ask"] if side == "buy" else market["bid"]),
                         "sz": fmt(unit * (second % 17 + 1)), "side": side, "source": "0",
                         "ts": str(second * 1000 + 137)})
        return rows

    def _candles(self, call, reach, max_limit, bars=CANDLE_BARS):
        params = call.params
        inst = self._instrument(text_param(params, "instId"))
        bar = text_param(params, "bar", required=False) or "1m"
        if bar not in bars:
            raise param_error("bar")
        after, before = ms_param(params, "after"), ms_param(params, "before")
        limit = int_param(params, "limit", 100, 1, max_limit)
        grid = BarGrid(bar)
        newest = grid.index(self.now_ms())
        top, bottom = newest, max(newest - reach + 1, grid.index(CANDLES_FLOOR_MS) + 1)
        if after is not None:
            top = min(top, grid.index(after - 1))           # bars opening strictly before `after`
        if before is not None:
            bottom = max(bottom, grid.index(before) + 1)    # bars opening strictly after `before`
        return [self._candle_row(inst, grid, n, n == newest)
                for n in range(top, max(bottom, top - limit + 1) - 1, -1)]

    def _candle_row(self, inst, grid, n, forming):
        """Bar n, a pure function of its open time: its close is the next bar's open price."""
        market, tick = self._market[inst["instId"]], Decimal(inst["tickSz"])
        opened = grid.open_ms(n)
        open_px = wave_price(market["base"], tick, opened)
        close_px = wave_price(market["base"], tick, grid.open_ms(n + 1))
        spread = (market["base"] * Decimal("0.001") * (1 + n % 5)).quantize(tick)
        if inst["instType"] == "SPOT":
            vol = Decimal(inst["minSz"]) * 100 * (n % 89 + 11)
            vol_ccy = vol_quote = vol * close_px
        else:
            vol = Decimal(10 * (n % 89 + 11))
            if inst["ctType"] == "inverse":
                vol_ccy, vol_quote = rounded(vol * self._contract_size(inst) / close_px, 8), vol * 100
            else:
                vol_ccy = vol * self._contract_size(inst)
                vol_quote = vol_ccy * close_px
        return [str(opened), fmt(open_px), fmt(max(open_px, close_px) + spread),
                fmt(min(open_px, close_px) - spread), fmt(close_px), fmt(vol), fmt(vol_ccy), fmt(vol_quote),
                "0" if forming else "1"]

    def _api_candles(self, call):
        bars = {name: spec for name, spec in CANDLE_BARS.items() if name != "1s"}
        return self._candles(call, CANDLES_REACH, 300, bars)

    def _api_history_candles(self, call):
        return self._candles(call, HISTORY_CANDLES_REACH, 100)

    def _api_funding_rate(self, call):
        inst_id = text_param(call.params, "instId")
        if inst_id == "ANY":
            inst_ids = [i for i, inst in self._instruments.items() if inst["instType"] == "SWAP"]
        elif self._instrument(inst_id)["instType"] != "SWAP":
            raise OkxError("51001", "Instrument ID, Instrument ID code or Spread ID doesn't exist.")
        else:
            inst_ids = [inst_id]
        rows = []
        for inst_id in inst_ids:
            rate, funding_time, next_time = self._funding.get(inst_id, (Decimal("0.0001"), 0, 0))
            rows.append({
                "formulaType": "noRate", "fundingRate": fmt(rate), "fundingTime": str(funding_time),
                "impactValue": "", "instId": inst_id, "instType": "SWAP", "interestRate": "",
                "maxFundingRate": "0.00375", "method": "current_period", "minFundingRate": "-0.00375",
                "nextFundingRate": "", "nextFundingTime": str(next_time), "premium": "0.0000910113652644",
                "settFundingRate": fmt(rate), "settState": "settled", "ts": str(self.now_ms())})
        return rows

    # -- account ---------------------------------------------------------------------------------------

    def _api_balance(self, call):
        account, spot_mode = call.account, call.account["acct_lv"] == "1"
        wanted = set(filter(None, text_param(call.params, "ccy", required=False).split(",")))
        upl, ord_frozen = {}, {}
        for position in account["positions"].values():
            row = self._position_row(account, position)
            upl[row["ccy"]] = upl.get(row["ccy"], Decimal(0)) + Decimal(row["upl"])
        for order in account["orders"].values():
            if order["_reserve"]:
                ccy, amount = order["_reserve"]
                ord_frozen[ccy] = ord_frozen.get(ccy, Decimal(0)) + amount
        details, total_usd, upl_usd, stamp = [], Decimal(0), Decimal(0), str(self.now_ms())
        for ccy in sorted(account["balances"]):
            avail, frozen = account["balances"][ccy]
            cash, ccy_upl = avail + frozen, upl.get(ccy, Decimal(0))
            equity = cash + ccy_upl
            if (cash == 0 and equity == 0) or (wanted and ccy not in wanted):
                continue
            eq_usd = rounded(equity * self._usd_price(ccy), 8)
            total_usd += eq_usd
            upl_usd += ccy_upl * self._usd_price(ccy)
            details.append({
                "availBal": fmt(avail), "availEq": "" if spot_mode else fmt(avail + ccy_upl), "borrowFroz": "",
                "cashBal": fmt(cash), "ccy": ccy, "crossLiab": "", "disEq": fmt(eq_usd), "eq": fmt(equity),
                "eqUsd": fmt(eq_usd), "fixedBal": "0", "frozenBal": fmt(frozen),
                "imr": "", "interest": "", "isoEq": "0", "isoLiab": "", "isoUpl": "0", "liab": "",
                "maxLoan": "", "mgnRatio": "", "mmr": "", "notionalLever": "",
                "ordFrozen": fmt(ord_frozen.get(ccy, Decimal(0))), "stgyEq": "0", "twap": "0",
                "uTime": stamp, "upl": fmt(ccy_upl), "uplLiab": ""})
        return [{"adjEq": "", "availEq": "", "borrowFroz": "", "details": details, "imr": "", "isoEq": "0",
                 "mgnRatio": "", "mmr": "", "notionalUsd": "", "ordFroz": "", "totalEq": fmt(total_usd),
                 "uTime": stamp, "upl": fmt(rounded(upl_usd, 8))}]

    def _api_config(self, call):
        account = call.account
        return [{"acctLv": account["acct_lv"], "acctStpMode": "cancel_maker", "autoLoan": False,
                 "ctIsoMode": "automatic", "enableSpotBorrow": False, "greeksType": "PA", "ip": "",
                 "kycLv": "3", "label": "fake okx demo" if account["demo"] else "fake okx", "level": "Lv1",
                 "levelTmp": "", "liquidationGear": "-1", "mainUid": account["uid"], "mgnIsoMode": "automatic",
                 "opAuth": "1", "perm": "read_only,withdraw,trade", "posMode": account["pos_mode"],
                 "roleType": "0", "spotBorrowAutoRepay": False, "spotOffsetType": "", "spotRoleType": "0",
                 "spotTraderInsts": [], "traderInsts": [], "type": "0", "uid": account["uid"]}]

    def _position_row(self, account, position):
        inst = self._instruments[position["instId"]]
        market, tick = self._market[inst["instId"]], Decimal(inst["tickSz"])
        size, avg, lever, mark = abs(position["pos"]), position["avgPx"], position["lever"], market["last"]
        long = position["posSide"] == "long" or (position["posSide"] == "net" and position["pos"] > 0)
        upl = self._pnl(inst, long, avg, mark, size)
        notional = self._notional(inst, size, mark)
        edge = 1 / lever - MMR_RATE
        liq_px = (avg * (1 - edge if long else 1 + edge)).quantize(tick)
        isolated = position["mgnMode"] == "isolated"
        margin = fmt(rounded(position["margin"], 10))
        return {
            "adl": "1", "availPos": "" if position["posSide"] == "net" else fmt(self._closable(
                account, inst["instId"], position["mgnMode"], position["posSide"], long)), "avgPx": fmt(avg),
            "cTime": str(position["cTime"]), "ccy": inst["settleCcy"], "imr": "" if isolated else margin,
            "instId": inst["instId"], "instType": inst["instType"], "interest": "", "last": fmt(mark),
            "lever": fmt(lever), "liab": "", "liabCcy": "", "liqPx": fmt(liq_px), "margin": margin if isolated else "",
            "markPx": fmt(mark), "mgnMode": position["mgnMode"],
            "mgnRatio": fmt(rounded((position["margin"] + upl) / (notional * MMR_RATE), 8)) if notional else "",
            "mmr": fmt(rounded(notional * MMR_RATE, 10)),
            "notionalUsd": fmt(rounded(size * self._contract_size(inst) * (mark if inst["ctType"] == "linear" else 1),
                                       8)),
            "pos": fmt(position["pos"]), "posCcy": "", "posId": position["posId"], "posSide": position["posSide"],
            "realizedPnl": fmt(rounded(position["realizedPnl"], 10)), "uTime": str(position["uTime"]),
            "upl": fmt(rounded(upl, 10)), "uplRatio": fmt(rounded(upl / position["margin"], 8))
            if position["margin"] else "0",
        }

    def _api_positions(self, call):
        inst_type = self._inst_type_param(call.params, False, ("MARGIN", "SWAP", "FUTURES", "OPTION"))
        inst_ids = set(filter(None, text_param(call.params, "instId", required=False).split(",")))
        rows = [self._position_row(call.account, p) for p in call.account["positions"].values()
                if (not inst_ids or p["instId"] in inst_ids)
                and (not inst_type or self._instruments[p["instId"]]["instType"] == inst_type)]
        return sorted(rows, key=lambda row: int(row["cTime"]), reverse=True)

    def _lever_sides(self, account, inst, mgn_mode, pos_side=""):
        """The posSide keys a leverage setting applies to."""
        if pos_side:
            return [pos_side]
        if account["pos_mode"] == "long_short_mode" and inst["instType"] != "SPOT":
            return ["long", "short"]
        return ["net"]

    @account_change()
    def _api_set_leverage(self, call):
        params, account = call.params, call.account
        lever_text = str(params.get("lever", ""))       # ccxt sends a JSON number here; OKX takes both
        if lever_text == "":
            raise param_missing("lever")
        try:
            lever = Decimal(lever_text)
        except InvalidOperation:
            raise param_error("lever")
        mgn_mode = text_param(params, "mgnMode")
        if mgn_mode not in ("cross", "isolated"):
            raise param_error("mgnMode")
        inst = self._instrument(text_param(params, "instId"))
        if not lever.is_finite() or lever < 1:
            raise param_error("lever")
        if lever > Decimal(inst["lever"]):
            raise OkxError("59102", "Leverage exceeds the maximum leverage. Adjust the leverage.")
        pos_side = text_param(params, "posSide", required=False)
        hedged_isolated = (account["pos_mode"] == "long_short_mode" and mgn_mode == "isolated"
                           and inst["instType"] != "SPOT")
        if pos_side and (not hedged_isolated or pos_side not in ("long", "short")):
            raise param_error("posSide")
        if hedged_isolated and not pos_side:
            raise param_missing("posSide")
        for side in self._lever_sides(account, inst, mgn_mode, pos_side):
            account["leverage"][(inst["instId"], mgn_mode, side)] = lever
            position = account["positions"].get((inst["instId"], mgn_mode, side))
            if position:
                position["lever"] = lever
        return [{"lever": fmt(lever), "mgnMode": mgn_mode, "instId": inst["instId"], "posSide": pos_side}]

    def _api_leverage_info(self, call):
        params, account = call.params, call.account
        mgn_mode = text_param(params, "mgnMode")
        if mgn_mode not in ("cross", "isolated"):
            raise param_error("mgnMode")
        inst_ids = text_param(params, "instId").split(",")
        if len(inst_ids) > 20:
            raise param_error("instId")
        rows = []
        for inst_id in inst_ids:
            inst = self._instrument(inst_id)
            for side in self._lever_sides(account, inst, mgn_mode):
                lever = account["leverage"].get((inst_id, mgn_mode, side), DEFAULT_LEVER)
                rows.append({"instId": inst_id, "mgnMode": mgn_mode, "posSide": side, "lever": fmt(lever)})
        return rows

    def _api_set_position_mode(self, call):
        mode = text_param(call.params, "posMode")
        if mode not in ("net_mode", "long_short_mode"):
            raise param_error("posMode")
        busy = call.account["positions"] or any(
            o["state"] in PENDING and o["instType"] != "SPOT" for o in call.account["orders"].values())
        if busy:
            raise OkxError("59000", "Settings failed. Close any open positions or orders before modifying settings.")
        call.account["pos_mode"] = mode
        return [{"posMode": mode}]

    # -- trading ---------------------------------------------------------------------------------------

    def _new_order_row(self, account, inst, ctime, cl_ord_id, tag, side, ord_type, sz, px, td_mode, pos_side,
                       tgt_ccy, reduce_only):
        spot = inst["instType"] == "SPOT"
        base, quote = inst["instId"].split("-")[:2]
        fee_ccy = (base if side == "buy" else quote) if spot else inst["settleCcy"]
        lever = "" if spot else fmt(account["leverage"].get((inst["instId"], td_mode, pos_side), DEFAULT_LEVER))
        order = dict.fromkeys(("algoClOrdId", "algoId", "attachAlgoClOrdId", "cancelSource", "cancelSourceReason",
                               "ccy", "pxType", "pxUsd", "pxVol", "quickMgnType", "slOrdPx", "slTriggerPx",
                               "slTriggerPxType", "source", "stpId", "tpOrdPx", "tpTriggerPx", "tpTriggerPxType",
                               "avgPx", "fillPx", "fillTime", "tradeId"), "")
        order.update({
            "accFillSz": "0", "attachAlgoOrds": [], "cTime": str(ctime), "category": "normal",
            "clOrdId": cl_ord_id, "fee": "0", "feeCcy": fee_ccy, "fillSz": "0", "instId": inst["instId"],
            "instType": inst["instType"],
            "isTpLimit": "false", "lever": lever, "linkedAlgoOrd": {"algoId": ""},
            "ordId": str(ctime * 1000000 + self._seq % 1000000), "ordType": ord_type, "pnl": "0",
            "posSide": pos_side, "px": "" if px is None else fmt(px), "rebate": "0",
            "rebateCcy": quote if spot else inst["settleCcy"], "reduceOnly": "true" if reduce_only else "false",
            "side": side, "state": "live", "stpMode": "cancel_maker", "sz": fmt(sz), "tag": tag,
            "tdMode": td_mode, "tgtCcy": tgt_ccy, "tradeQuoteCcy": quote if spot else "", "uTime": str(ctime),
            "_reserve": None,     # (ccy, amount) still frozen for the unfilled rest of the order
            "_target": sz,        # fill size (base ccy or contracts) that completes the order
        })
        order.update(self._child_fields)        # an algo order's child: its algoId and algoClOrdId
        self._seq += 1
        return order

    def _closable(self, account, inst_id, td_mode, pos_side, long):
        """Contracts of a position that may still be closed: its size minus pending closing orders."""
        position = account["positions"].get((inst_id, td_mode, pos_side))
        if not position or (pos_side == "net" and (position["pos"] > 0) != long):
            return Decimal(0)
        claimed = sum(o["_target"] - Decimal(o["accFillSz"]) for o in account["orders"].values()
                      if o["state"] in PENDING and o["instId"] == inst_id and o["tdMode"] == td_mode
                      and o["posSide"] == pos_side and self._is_closing(account, o))
        return abs(position["pos"]) - claimed

    @staticmethod
    def _is_closing(account, order):
        if account["pos_mode"] == "long_short_mode":
            return (order["side"] == "sell") == (order["posSide"] == "long")
        return order["reduceOnly"] == "true"

    @staticmethod
    def _mode_and_side(account, params, spot):
        """An order's (tdMode, side), checked as OKX checks them for plain and algo orders alike."""
        td_mode = text_param(params, "tdMode")
        if td_mode not in (("cash",) if spot else ("cross", "isolated")):
            raise param_error("tdMode")
        if not spot and account["acct_lv"] == "1":
            raise OkxError("51010", "You can't complete this request under your current account mode.")
        side = text_param(params, "side")
        if side not in ("buy", "sell"):
            raise param_error("side")
        return td_mode, side

    @account_change("place")
    def _place(self, account, params, headers):
        """Place an order as OKX does: check its parameters, reserve funds or margin, store it and fill
        what crosses the book. An OkxError raised here becomes the answer's sCode/sMsg."""
        exp_time = headers.get("expTime", "")
        if exp_time:
            if not exp_time.isdigit():
                raise param_error("expTime")
            if self.now_ms() > int(exp_time):
                raise OkxError("50037", "Order expired.")
        inst = self._instrument(text_param(params, "instId"))
        inst_id, spot = inst["instId"], inst["instType"] == "SPOT"
        td_mode, side = self._mode_and_side(account, params, spot)
        ord_type = text_param(params, "ordType")
        if ord_type not in ORDER_TYPES:
            raise param_error("ordType")
        cl_ord_id = text_param(params, "clOrdId", required=False)
        if cl_ord_id and not ID_PATTERN.match(cl_ord_id):
            raise param_error("clOrdId")
        tag = text_param(params, "tag", required=False)
        if tag and not TAG_PATTERN.match(tag):
            raise param_error("tag")
        reduce_only = params.get("reduceOnly", False)
        if not isinstance(reduce_only, bool):
            raise param_error("reduceOnly")
        hedge = account["pos_mode"] == "long_short_mode" and inst["instType"] in ("SWAP", "FUTURES")
        pos_side = text_param(params, "posSide", required=False)
        if pos_side not in (("long", "short") if hedge else ("", "net")):
            raise param_error("posSide")
        pos_side = pos_side or "net"
        sz = decimal_param(params, "sz")
        tgt_ccy = text_param(params, "tgtCcy", required=False)
        if tgt_ccy and (tgt_ccy not in ("base_ccy", "quote_ccy") or not spot or ord_type != "market"):
            raise param_error("tgtCcy")
        if spot and ord_type == "market" and not tgt_ccy:
            tgt_ccy = "quote_ccy" if side == "buy" else "base_ccy"
        tick, lot, min_sz = Decimal(inst["tickSz"]), Decimal(inst["lotSz"]), Decimal(inst["minSz"])
        px = None
        if ord_type != "market":
            px = decimal_param(params, "px")
            if px % tick:
                raise param_error("px")
        market = self._market[inst_id]
        best = market["ask"] if side == "buy" else market["bid"]
        crosses = ord_type == "market" or (px >= best if side == "buy" else px <= best)
        if cl_ord_id and any(o["clOrdId"] == cl_ord_id and o["state"] in PENDING for o in account["orders"].values()):
            raise OkxError("51016", "Client order ID already exists.")
        target = sz
        if tgt_ccy == "quote_ccy":                       # sz is an amount of quote currency
            target = (sz / best).quantize(lot, ROUND_DOWN)
        elif sz % lot:
            raise OkxError("51121", "Order quantity must be a multiple of the lot size.")
        if target < min_sz:
            raise OkxError("51020", "Your order should meet or exceed the minimum order amount.")
        if ord_type == "post_only" and crosses:
            raise OkxError("51019", "Order failed. The post-only order would take liquidity.")
        price = px if px is not None else best

        # What the order freezes until it fills: the quote (buy) or base (sell) of a spot order, the
        # initial margin of the part of a derivative order that opens a position.
        if spot:
            base, quote = inst_id.split("-")
            if side == "buy":
                reserve = (quote, sz if tgt_ccy == "quote_ccy" else target * price)
            else:
                reserve = (base, target)
        elif inst["instType"] == "OPTION":
            reserve = self._option_reserve(account, inst, side, td_mode, sz, price, ord_type)
        else:
            closing = self._is_closing(account, {"side": side, "posSide": pos_side,
                                                 "reduceOnly": "true" if reduce_only else "false"})
            position = account["positions"].get((inst_id, td_mode, pos_side))
            if closing:
                long = pos_side == "long" if hedge else side == "sell"
                closable = self._closable(account, inst_id, td_mode, pos_side, long)
                if not position or (not hedge and (position["pos"] > 0) != long):
                    raise OkxError("51169", "Order failed because you don't have any positions in this direction"
                                            " for this contract to reduce or close.")
                if sz > closable:
                    raise OkxError("51170", "Order failed. The reduce-only order size exceeds the closable"
                                            " position.")
                opening = Decimal(0)
            elif not hedge and position and (position["pos"] > 0) != (side == "buy"):
                opening = max(Decimal(0), sz - abs(position["pos"]))
            else:
                opening = sz
            lever = account["leverage"].get((inst_id, td_mode, pos_side), DEFAULT_LEVER)
            reserve = (inst["settleCcy"], rounded(self._notional(inst, opening, price) / lever))
        ccy, amount = reserve
        balance = account["balances"].setdefault(ccy, [Decimal(0), Decimal(0)])
        if balance[0] < amount:
            raise OkxError("51008", "Order failed. Insufficient %s balance in account." % ccy)

        order = self._new_order_row(account, inst, self.now_ms(), cl_ord_id, tag, side, ord_type, sz, px,
                                    td_mode, pos_side, tgt_ccy, reduce_only)
        order.update(_target=target, _reserve=reserve)
        balance[0] -= amount
        balance[1] += amount
        account["orders"][order["ordId"]] = order
        if crosses:                 # takers fill at once, all of it, at the best price

            self._fill(account, order, target, best)
        if ord_type in ("market", "ioc", "fok") and order["state"] in PENDING:
            self._cancel(account, order)
        return order

    @account_change("fill")
    def _fill(self, account, order, qty, price):
        """Fill `qty` of an order at `price`: balances, fee, position and the order's fill fields."""
        inst = self._instruments[order["instId"]]
        filled_before = Decimal(order["accFillSz"])
        remaining = order["_target"] - filled_before
        if order["_reserve"]:                  # unfreeze this fill's share of the reservation
            ccy, amount = order["_reserve"]
            released = amount if qty == remaining else rounded(amount * qty / remaining)
            balance = account["balances"][ccy]
            balance[0] += released
            balance[1] -= released
            order["_reserve"] = (ccy, amount - released) if qty < remaining else None
        pnl = Decimal(0)
        if inst["instType"] == "SPOT":
            base, quote = inst["instId"].split("-")
            value = qty * price
            balances = account["balances"]
            for ccy in (base, quote):
                balances.setdefault(ccy, [Decimal(0), Decimal(0)])
            if order["side"] == "buy":
                fee = qty * self.fee_rate
                balances[quote][0] -= value
                balances[base][0] += qty - fee
            else:
                fee = value * self.fee_rate
                balances[base][0] -= qty
                balances[quote][0] += value - fee
        elif inst["instType"] == "OPTION":
            fee, pnl = self._fill_option(account, inst, order, qty, price)
        else:
            fee = self._notional(inst, qty, price) * self.fee_rate
            pnl = self._move_position(account, inst, order, qty, price)
            account["balances"][inst["settleCcy"]][0] -= fee
        filled = filled_before + qty
        old_avg = Decimal(order["avgPx"] or 0)
        stamp = str(self.now_ms())
        order.update(
            accFillSz=fmt(filled), avgPx=fmt(rounded((old_avg * filled_before + price * qty) / filled, 10)),
            fillPx=fmt(price), fillSz=fmt(qty), fillTime=stamp, tradeId=self._next_id(900000000),
            fee=fmt(Decimal(order["fee"]) - fee), pnl=fmt(Decimal(order["pnl"]) + pnl), uTime=stamp,
            state="filled" if filled >= order["_target"] else "partially_filled")

    @account_change()
    def _move_position(self, account, inst, order, qty, price):
        """Apply a derivative fill to the position; returns the realised profit (settle currency)."""
        hedge = account["pos_mode"] == "long_short_mode"
        key = (inst["instId"], order["tdMode"], order["posSide"])
        position = account["positions"].get(key)
        if position is None:
            position = account["positions"][key] = {
                "instId": inst["instId"], "mgnMode": order["tdMode"], "posSide": order["posSide"],
                "pos": Decimal(0), "avgPx": price, "margin": Decimal(0), "realizedPnl": Decimal(0),
                "lever": Decimal(order["lever"]), "posId": self._next_id(int(self.now_ms()) * 100000),
                "cTime": self.now_ms(), "uTime": self.now_ms()}
        buy, pnl = order["side"] == "buy", Decimal(0)
        if hedge:
            sign = 1
            closing = min(qty, position["pos"]) if self._is_closing(account, order) else Decimal(0)
            opening = qty - closing if not self._is_closing(account, order) else Decimal(0)
        else:
            sign = 1 if buy else -1
            against = position["pos"] != 0 and (position["pos"] > 0) != buy
            closing = min(qty, abs(position["pos"])) if against else Decimal(0)
            opening = qty - closing
        balance = account["balances"].setdefault(inst["settleCcy"], [Decimal(0), Decimal(0)])
        if closing:
            size = abs(position["pos"])
            long = order["posSide"] == "long" or (order["posSide"] == "net" and position["pos"] > 0)
            margin = rounded(position["margin"] * closing / size)
            pnl = self._pnl(inst, long, position["avgPx"], price, closing)
            position["margin"] -= margin
            position["realizedPnl"] += pnl
            position["pos"] += -closing if hedge else closing * sign
            balance[0] += margin + pnl
            balance[1] -= margin
        if opening:
            size = abs(position["pos"])
            position["avgPx"] = rounded((position["avgPx"] * size + price * opening) / (size + opening), 10)
            margin = rounded(self._notional(inst, opening, price) / position["lever"])
            position["margin"] += margin
            position["pos"] += opening * sign
            balance[0] -= margin
            balance[1] += margin
        position["uTime"] = self.now_ms()
        if position["pos"] == 0:
            del account["positions"][key]
        return pnl

    @account_change("cancel")
    def _cancel(self, account, order):
        if order["_reserve"]:
            ccy, amount = order["_reserve"]
            account["balances"][ccy][0] += amount
            account["balances"][ccy][1] -= amount
            order["_reserve"] = None
        order.update(state="canceled", uTime=str(self.now_ms()))

    def _find_order(self, account, inst_id, ord_id, cl_ord_id):
        """By ordId, or else the latest order with that clOrdId; None when unknown."""
        if ord_id:
            order = account["orders"].get(ord_id)
            return order if order and order["instId"] == inst_id else None
        same = [o for o in account["orders"].values() if o["clOrdId"] == cl_ord_id and o["instId"] == inst_id]
        return max(same, key=lambda o: int(o["ordId"])) if same else None

    def _kept(self, order, now, days, unfilled_canceled):
        """Whether a finished order is still listed: placed within `days`; a canceled order without fills
        only when `unfilled_canceled` and canceled less than 2 hours ago."""
        if int(order["cTime"]) < now - days * DAY_MS:
            return False
        if order["state"] in ("canceled", "mmp_canceled") and Decimal(order["accFillSz"]) == 0:
            return unfilled_canceled and int(order["uTime"]) >= now - CANCELED_KEPT_MS
        return True

    def _trade_answer(self, code, row, in_time):
        return {"code": code, "msg": "", "data": [row], "inTime": str(in_time),
                "outTime": str(self.now_us())}

    def _api_place_order(self, call):
        in_time, params = self.now_us(), call.params
        try:
            order = self._place(call.account, params, call.headers)
        except OkxError as error:
            return self._trade_answer("1", {"ordId": "", "clOrdId": str(params.get("clOrdId", "")),
                                            "tag": str(params.get("tag", "")), "ts": str(self.now_ms()),
                                            "sCode": error.code, "sMsg": error.msg}, in_time)
        return self._trade_answer("0", {"ordId": order["ordId"], "clOrdId": order["clOrdId"], "tag": order["tag"],
                                        "ts": order["cTime"], "sCode": "0", "sMsg": "Order placed"}, in_time)

    def _api_cancel_order(self, call):
        in_time, params = self.now_us(), call.params
        ord_id, cl_ord_id = str(params.get("ordId", "")), str(params.get("clOrdId", ""))
        try:
            inst = self._instrument(text_param(params, "instId"))
            if not ord_id and not cl_ord_id:
                raise param_missing("ordId")
            order = self._find_order(call.account, inst["instId"], ord_id, cl_ord_id)
            if order is None or order["state"] not in PENDING:
                raise OkxError("51400", "Order cancellation failed as the order has been filled, canceled or does"
                                        " not exist.")
        except OkxError as error:
            return self._trade_answer("1", {"ordId": ord_id, "clOrdId": cl_ord_id, "ts": str(self.now_ms()),
                                            "sCode": error.code, "sMsg": error.msg}, in_time)
        self._cancel(call.account, order)
        return self._trade_answer("0", {"ordId": order["ordId"], "clOrdId": order["clOrdId"],
                                        "ts": str(self.now_ms()), "sCode": "0", "sMsg": ""}, in_time)

    def _api_get_order(self, call):
        params = call.params
        inst = self._instrument(text_param(params, "instId"))
        ord_id = text_param(params, "ordId", required=False)
        cl_ord_id = text_param(params, "clOrdId", required=False)
        if not ord_id and not cl_ord_id:
            raise param_missing("ordId")
        order = self._find_order(call.account, inst["instId"], ord_id, cl_ord_id)
        if order is None or (order["state"] in FINISHED and not self._kept(order, self.now_ms(), ARCHIVE_DAYS, True)):
            raise OkxError("51603", "Order does not exist.")
        return [public_order(order)]

    def _order_filters(self, params, states):
        """The instType/instId/ordType/state filters shared by the order lists, as a predicate."""
        inst_type = self._inst_type_param(params, required=False)
        inst_id = text_param(params, "instId", required=False)
        ord_type = text_param(params, "ordType", required=False)
        state = text_param(params, "state", required=False)
        if state and state not in states:
            raise param_error("state")

        def wanted(order):
            return (order["state"] in ((state,) if state else states)
                    and inst_type in ("", order["instType"]) and inst_id in ("", order["instId"])
                    and ord_type in ("", order["ordType"]))
        return wanted

    def _api_orders_pending(self, call):
        wanted = self._order_filters(call.params, PENDING)
        return [public_order(o) for o in page_by_ord_id(filter(wanted, call.account["orders"].values()),
                                                        call.params)]

    def _finished_orders(self, call, days, unfilled_canceled):
        params = call.params
        self._inst_type_param(params)
        wanted = self._order_filters(params, FINISHED)
        begin, end, now = ms_param(params, "begin"), ms_param(params, "end"), self.now_ms()
        rows = [o for o in call.account["orders"].values() if wanted(o) and self._kept(o, now, days, unfilled_canceled)
                and (begin is None or int(o["cTime"]) >= begin) and (end is None or int(o["cTime"]) <= end)]
        return [public_order(o) for o in page_by_ord_id(rows, params)]

    def _api_orders_history(self, call):
        return self._finished_orders(call, HISTORY_DAYS, True)

    def _api_orders_history_archive(self, call):
        return self._finished_orders(call, ARCHIVE_DAYS, False)

    # -- algo orders ------------------------------------------------------------------------------------
    # An algo (condition) order lives in account["algos"] (algoId -> OKX's algo row, plus "_" bookkeeping).
    # It freezes nothing. trigger_check() (run by set_price) fires it once the last price reaches a trigger:
    # its child order then goes through _place like any order, so it may fill at once, rest, or be refused
    # (the algo order ends order_failed with that refusal's code in failCode). index and mark trigger
    # prices are compared with the last price too.

    refuse_net_mode_triggers = True    # 51298: trigger orders on SWAP/FUTURES in net mode (OKX's error table)
    _child_fields = {}                 # the algoId/algoClOrdId _new_order_row gives the child being placed

    def algo_orders(self, key=KEY):
        """Every algo order of the account (OKX fields, newest first), whatever its state or age."""
        with self._lock:
            algos = sorted(self._algos(self.accounts[key]).values(), key=lambda a: int(a["algoId"]), reverse=True)
            return [public_order(algo) for algo in algos]

    def trigger_check(self, inst_id=None):
        """Fire every live algo order (of every account) on `inst_id` (default: every instrument) whose
        trigger the instrument's last price has reached. Returns the algoIds fired, oldest first."""
        fired = []
        with self._lock:
            for account in self.accounts.values():
                for algo in sorted(self._algos(account).values(), key=lambda a: int(a["algoId"])):
                    if algo["state"] != "live" or inst_id not in (None, algo["instId"]):
                        continue
                    leg = self._fired_leg(algo, self._market[algo["instId"]]["last"])
                    if leg is not None:
                        self._trigger(account, algo, leg)
                        fired.append(algo["algoId"])
        return fired

    @staticmethod
    def _algos(account):
        return account.setdefault("algos", {})

    @staticmethod
    def _active_legs(algo):
        """The TP/SL legs that may fire, stop-loss first: a conditional order with both legs performs only
        its stop-loss (OKX's place-algo-order notes); an oco order both, the first to fire wins."""
        legs = [leg for leg in ("sl", "tp") if algo[leg + "TriggerPx"]]
        return legs[:1] if algo["ordType"] == "conditional" else legs

    def _fired_leg(self, algo, last):
        """"tp" or "sl" (or "" for a trigger order) when the algo order fires at `last`, else None."""
        if algo["ordType"] == "trigger":
            trigger = Decimal(algo["triggerPx"])
            return "" if (last >= trigger if algo["_rising"] else last <= trigger) else None
        for leg in self._active_legs(algo):
            if leg_fires(algo["side"], leg, last, Decimal(algo[leg + "TriggerPx"])):
                return leg
        return None

    def _trigger(self, account, algo, leg):
        """The algo order fires: its child (market for an order price of -1, else limit) is placed."""
        spot = algo["instType"] == "SPOT"
        ord_px = algo["ordPx"] if leg == "" else algo[leg + "OrdPx"]
        params = {"instId": algo["instId"], "tdMode": algo["tdMode"], "side": algo["side"], "sz": algo["sz"],
                  "ordType": "market" if ord_px == "-1" else "limit", "reduceOnly": algo["reduceOnly"] == "true"}
        if ord_px != "-1":
            params["px"] = ord_px
        elif spot:
            params["tgtCcy"] = algo["tgtCcy"] or "base_ccy"     # trigger orders have no tgtCcy: sz is base
        if algo["posSide"] != "net":
            params["posSide"] = algo["posSide"]
        stamp = str(self.now_ms())
        algo.update(actualSide=leg, triggerTime=stamp, uTime=stamp)
        self._child_fields = {"algoId": algo["algoId"], "algoClOrdId": algo["algoClOrdId"]}
        try:
            order = self._place(account, params, {})
        except OkxError as error:
            algo.update(state="order_failed", failCode=error.code)
            return
        finally:
            self._child_fields = {}
        actual_px = order["px"] or order["avgPx"] or fmt(self._market[algo["instId"]]["last"])
        algo.update(state="effective", actualSz=algo["sz"], actualPx=actual_px, ordId=order["ordId"],
                    ordIdList=[order["ordId"]])

    def _find_algo(self, account, inst_id, algo_id, algo_cl_ord_id):
        """By algoId (it wins), or else the latest algo order with that algoClOrdId; None when unknown or,
        with `inst_id`, on another instrument."""
        algos = self._algos(account)
        if algo_id:
            algo = algos.get(algo_id)
        else:
            same = [a for a in algos.values() if a["algoClOrdId"] == algo_cl_ord_id]
            algo = max(same, key=lambda a: int(a["algoId"])) if same else None
        return algo if algo is not None and inst_id in ("", algo["instId"]) else None

    def _trigger_px_type(self, params, name, inst):
        px_type = text_param(params, name, required=False) or "last"
        if px_type not in TRIGGER_PX_TYPES:
            raise param_error(name)
        if inst["instType"] == "SPOT" and px_type != "last":
            raise OkxError("51415", 'Unable to place order. Spot trading only supports using the last price as '
                                    'trigger price. Please select "Last" and try again.')
        return px_type

    def _new_algo(self, account, params):
        """Check an order-algo body as OKX does and store the algo order, live; raises OkxError."""
        inst = self._instrument(text_param(params, "instId"))
        inst_id, inst_type = inst["instId"], inst["instType"]
        spot, contract = inst_type == "SPOT", inst_type in ("SWAP", "FUTURES")
        algo_cl_ord_id = id_param(params, "algoClOrdId")
        if algo_cl_ord_id and any(a["algoClOrdId"] == algo_cl_ord_id for a in self._algos(account).values()):
            raise OkxError("51065", "algoClOrdId already exists.")
        td_mode, side = self._mode_and_side(account, params, spot)
        ord_type = text_param(params, "ordType")
        if ord_type not in ALGO_ORD_TYPES or (ord_type == "trigger" and inst_type == "OPTION"):
            raise param_error("ordType")
        tag = text_param(params, "tag", required=False)
        if tag and not TAG_PATTERN.match(tag):
            raise param_error("tag")
        reduce_only = bool_param(params, "reduceOnly")
        hedge = account["pos_mode"] == "long_short_mode" and contract
        pos_side = text_param(params, "posSide", required=False)
        if hedge and not pos_side:
            raise param_missing("posSide")
        if pos_side not in (("long", "short") if hedge else ("", "net")):
            raise param_error("posSide")
        if ord_type == "trigger" and contract and not hedge and self.refuse_net_mode_triggers:
            raise OkxError("51298", "Trigger orders are not available in the net mode of Expiry Futures and "
                                    "Perpetual Futures")
        sz = decimal_param(params, "sz")
        tick, last = Decimal(inst["tickSz"]), self._market[inst_id]["last"]
        tgt_ccy = text_param(params, "tgtCcy", required=False)
        fields = {}
        if ord_type == "trigger":
            if tgt_ccy:
                raise OkxError("51281", "Trigger order do not support the tgtCcy parameter.")
            trigger = price_param(params, "triggerPx", tick)
            order_px = price_param(params, "orderPx", tick, market_ok=True)
            fields.update(triggerPx=fmt(trigger), ordPx=fmt(order_px), _rising=trigger >= last,
                          triggerPxType=self._trigger_px_type(params, "triggerPxType", inst))
            all_market = order_px == -1
        else:
            legs = {}
            for leg in ("tp", "sl"):
                trigger = price_param(params, leg + "TriggerPx", tick, required=False)
                order_px = price_param(params, leg + "OrdPx", tick, market_ok=True, required=False)
                if (trigger is None) != (order_px is None):
                    raise param_missing(leg + ("OrdPx" if order_px is None else "TriggerPx"))
                if trigger is not None:
                    legs[leg] = (trigger, order_px)
                    fields.update({leg + "TriggerPx": fmt(trigger), leg + "OrdPx": fmt(order_px),
                                   leg + "TriggerPxType": self._trigger_px_type(params, leg + "TriggerPxType", inst)})
            if not legs:
                raise either_missing("tpTriggerPx", "slTriggerPx")
            if ord_type == "oco" and len(legs) < 2:
                raise param_missing(("sl" if "tp" in legs else "tp") + "TriggerPx")
            checked = ["sl"] if ord_type == "conditional" and len(legs) == 2 else list(legs)
            for leg in checked:
                if leg_on_wrong_side(side, leg, last, legs[leg][0]):
                    raise OkxError(*WRONG_SIDE[(side, leg)])
            all_market = all(order_px == -1 for _, order_px in legs.values())
        if tgt_ccy and (tgt_ccy not in ("base_ccy", "quote_ccy") or not spot
                        or (tgt_ccy == "quote_ccy" and not all_market)):
            raise param_error("tgtCcy")
        if spot and ord_type != "trigger" and not tgt_ccy:
            tgt_ccy = "quote_ccy" if side == "buy" and all_market else "base_ccy"
        if tgt_ccy != "quote_ccy":
            if sz % Decimal(inst["lotSz"]):
                raise OkxError("51121", "Order quantity must be a multiple of the lot size.")
            if sz < Decimal(inst["minSz"]):
                raise OkxError("51020", "Your order should meet or exceed the minimum order amount.")

        now = self.now_ms()
        algo_id = str(now * 1000000 + self._seq % 1000000)
        self._seq += 1
        lever = account["leverage"].get((inst_id, td_mode, pos_side or "net"), DEFAULT_LEVER)
        algo = dict.fromkeys(("activePx", "actualPx", "actualSide", "callbackRatio", "callbackSpread", "ccy",
                              "chaseType", "chaseVal", "clOrdId", "closeFraction", "failCode", "isTradeBorrowMode",
                              "maxChaseType", "maxChaseVal", "moveTriggerPx", "ordId", "ordPx", "pxLimit",
                              "pxSpread", "pxVar", "quickMgnType", "slOrdPx", "slTriggerPx", "slTriggerPxType",
                              "szLimit", "timeInterval", "tpOrdPx", "tpTriggerPx", "tpTriggerPxType", "triggerPx",
                              "triggerPxType", "triggerTime"), "")
        algo.update({
            "actualSz": "0", "algoClOrdId": algo_cl_ord_id, "algoId": algo_id, "amendPxOnTriggerType": "0",
            "attachAlgoOrds": [], "cTime": str(now), "instId": inst_id, "instType": inst_type, "last": fmt(last),
            "lever": fmt(lever) if contract else "", "linkedOrd": {"ordId": ""}, "ordIdList": [],
            "ordType": ord_type, "posSide": pos_side or "net", "reduceOnly": "true" if reduce_only else "false",
            "side": side, "state": "live", "sz": fmt(sz), "tag": tag, "tdMode": td_mode, "tgtCcy": tgt_ccy,
            "tradeQuoteCcy": inst["quoteCcy"] if spot else "", "uTime": str(now),
            "_rising": False,     # a trigger order fires on last >= triggerPx (placed below it), else on <=
        })
        algo.update(fields)
        self._algos(account)[algo_id] = algo
        return algo

    def _api_place_algo(self, call):
        params = call.params
        try:
            algo = self._new_algo(call.account, params)
        except OkxError as error:
            return {"code": "1", "msg": "", "data": [{
                "algoClOrdId": str(params.get("algoClOrdId", "")), "algoId": "", "clOrdId": "",
                "sCode": error.code, "sMsg": error.msg, "tag": str(params.get("tag", ""))}]}
        return {"code": "0", "msg": "", "data": [{"algoClOrdId": algo["algoClOrdId"], "algoId": algo["algoId"],
                                                  "clOrdId": "", "sCode": "0", "sMsg": "", "tag": algo["tag"]}]}

    def _amend_algo(self, account, params):
        """Check an amend-algos body and change the algo order; raises OkxError. A TP or SL price of 0
        deletes that leg, as OKX documents."""
        inst = self._instrument(text_param(params, "instId"))
        algo_id = text_param(params, "algoId", required=False)
        algo_cl_ord_id = id_param(params, "algoClOrdId")
        if not algo_id and not algo_cl_ord_id:
            raise either_missing("algoId", "algoClOrdId")
        id_param(params, "reqId")
        bool_param(params, "cxlOnFail")
        algo = self._find_algo(account, inst["instId"], algo_id, algo_cl_ord_id)
        if algo is None or algo["state"] not in ALGO_PENDING:
            raise OkxError(*ALGO_AMEND_GONE)
        tick, last = Decimal(inst["tickSz"]), self._market[inst["instId"]]["last"]
        changes = {}
        new_sz = decimal_param(params, "newSz", required=False)
        if new_sz is not None:
            if algo["tgtCcy"] != "quote_ccy" and new_sz % Decimal(inst["lotSz"]):
                raise OkxError("51121", "Order quantity must be a multiple of the lot size.")
            changes["sz"] = fmt(new_sz)
        if algo["ordType"] == "trigger":
            trigger = price_param(params, "newTriggerPx", tick, required=False)
            order_px = price_param(params, "newOrdPx", tick, market_ok=True, required=False)
            if (trigger is None) != (order_px is None):
                raise param_missing("newOrdPx" if order_px is None else "newTriggerPx")
            if trigger is not None:
                changes.update(triggerPx=fmt(trigger), ordPx=fmt(order_px), _rising=trigger >= last,
                               triggerPxType=self._trigger_px_type(params, "newTriggerPxType", inst))
        else:
            changed = []
            for leg in ("tp", "sl"):
                names = ["new%s%s" % (leg.capitalize(), part) for part in ("TriggerPx", "OrdPx", "TriggerPxType")]
                trigger_text = text_param(params, names[0], required=False)
                order_text = text_param(params, names[1], required=False)
                if not trigger_text and not order_text:
                    continue
                if "0" in (trigger_text, order_text):       # deletes the leg
                    changes.update({leg + "TriggerPx": "", leg + "OrdPx": "", leg + "TriggerPxType": ""})
                    continue
                trigger = price_param(params, names[0], tick, required=False)
                order_px = price_param(params, names[1], tick, market_ok=True, required=False)
                trigger = trigger if trigger is not None else (Decimal(algo[leg + "TriggerPx"] or 0) or None)
                order_px = order_px if order_px is not None else (Decimal(algo[leg + "OrdPx"] or 0) or None)
                if trigger is None or order_px is None:
                    raise param_missing(names[1] if order_px is None else names[0])
                px_type = self._trigger_px_type(params, names[2], inst) if text_param(params, names[2], False) \
                    else algo[leg + "TriggerPxType"] or "last"
                changes.update({leg + "TriggerPx": fmt(trigger), leg + "OrdPx": fmt(order_px),
                                leg + "TriggerPxType": px_type})
                changed.append(leg)
            amended = dict(algo, **changes)
            if not amended["tpTriggerPx"] and not amended["slTriggerPx"]:
                raise OkxError("51531", "Order modification unsuccessful. The stop order must have either take "
                                        "profit or stop loss attached.")
            for leg in self._active_legs(amended):
                if leg in changed and leg_on_wrong_side(algo["side"], leg, last, Decimal(amended[leg + "TriggerPx"])):
                    raise OkxError(*WRONG_SIDE[(algo["side"], leg)])
                if amended["tgtCcy"] == "quote_ccy" and amended[leg + "OrdPx"] != "-1":
                    raise param_error("new%sOrdPx" % leg.capitalize())
        if not changes:
            raise OkxError(*AMEND_NOTHING)
        algo.update(changes)
        algo["uTime"] = str(self.now_ms())
        return algo

    def _api_amend_algos(self, call):
        params = call.params
        req_id = str(params.get("reqId", ""))
        try:
            algo = self._amend_algo(call.account, params)
        except OkxError as error:
            return {"code": "1", "msg": "", "data": [{
                "algoClOrdId": str(params.get("algoClOrdId", "")), "algoId": str(params.get("algoId", "")),
                "reqId": req_id, "sCode": error.code, "sMsg": error.msg}]}
        return {"code": "0", "msg": "", "data": [{"algoClOrdId": algo["algoClOrdId"], "algoId": algo["algoId"],
                                                  "reqId": req_id, "sCode": "0", "sMsg": ""}]}

    def _cancel_algo(self, account, params):
        """One item of cancel-algos: its answer row."""
        row = {"algoClOrdId": "", "algoId": str(params.get("algoId", "")), "clOrdId": "", "sCode": "0",
               "sMsg": "", "tag": ""}
        try:
            inst = self._instrument(text_param(params, "instId"))
            algo_id = text_param(params, "algoId", required=False)
            algo_cl_ord_id = id_param(params, "algoClOrdId")
            if not algo_id and not algo_cl_ord_id:
                raise either_missing("algoId", "algoClOrdId")
            algo = self._find_algo(account, inst["instId"], algo_id, algo_cl_ord_id)
            if algo is None or algo["state"] not in ALGO_PENDING:
                raise OkxError(*ALGO_CANCEL_GONE)
        except OkxError as error:
            row.update(sCode=error.code, sMsg=error.msg)
            return row
        algo.update(state="canceled", uTime=str(self.now_ms()))
        row["algoId"] = algo["algoId"]
        return row

    @staticmethod
    def _array_items(call, limit):
        """The items of an array body (cancel-algos, the batch endpoints): at least one, at most ``limit``."""
        if not call.params:
            raise param_missing("instId")
        if len(call.params) > limit:
            raise OkxError("51406", "Canceled - order count exceeds the limit %d." % limit, 400)
        return call.params

    def _api_cancel_algos(self, call):
        self._array_items(call, ALGO_CANCEL_MAX)
        rows = [self._cancel_algo(call.account, item) for item in call.params]
        code, msg = bulk_code(rows)
        return {"code": code, "msg": msg, "data": rows}

    def _algo_rows(self, call, states):
        """The algo orders in `states` that pass the list filters (ordType required: one type, or exactly
        conditional and oco; instType, instId, algoId)."""
        params = call.params
        types = text_param(params, "ordType").split(",")
        if not (len(types) == 1 and types[0] in ALGO_LISTED_TYPES) and sorted(types) != ["conditional", "oco"]:
            raise param_error("ordType")
        inst_type = self._inst_type_param(params, required=False, allowed=ALGO_INST_TYPES)
        inst_id = text_param(params, "instId", required=False)
        algo_id = text_param(params, "algoId", required=False)
        return [a for a in self._algos(call.account).values()
                if a["ordType"] in types and a["state"] in states and inst_type in ("", a["instType"])
                and inst_id in ("", a["instId"]) and algo_id in ("", a["algoId"])]

    def _api_algos_pending(self, call):
        rows = self._algo_rows(call, ALGO_PENDING)
        return [public_order(algo) for algo in page_by_id(rows, call.params, "algoId")]

    def _api_algos_history(self, call):
        """Finished algo orders of the last 3 months; `state` or `algoId` required."""
        params = call.params
        self._algo_rows(call, ())          # the ordType and filter checks come first
        state = text_param(params, "state", required=False)
        if not state and not text_param(params, "algoId", required=False):
            raise either_missing("state", "algoId")
        if state and state not in ALGO_HISTORY_STATES:
            raise param_error("state")
        floor = self.now_ms() - ARCHIVE_DAYS * DAY_MS
        rows = [a for a in self._algo_rows(call, (state,) if state else ALGO_HISTORY_STATES + ("partially_failed",))
                if int(a["cTime"]) >= floor]
        return [public_order(algo) for algo in page_by_id(rows, params, "algoId")]

    def _api_get_algo(self, call):
        algo_id = text_param(call.params, "algoId", required=False)
        algo_cl_ord_id = text_param(call.params, "algoClOrdId", required=False)
        if not algo_id and not algo_cl_ord_id:
            raise either_missing("algoId", "algoClOrdId")
        algo = self._find_algo(call.account, "", algo_id, algo_cl_ord_id)
        if algo is None or int(algo["cTime"]) < self.now_ms() - ARCHIVE_DAYS * DAY_MS:
            raise OkxError("51603", "Order does not exist.")
        return [public_order(algo)]

    # -- amending orders --------------------------------------------------------------------------------
    # amend-order answers sCode "0" for "accepted"; the outcome is recorded on the order by _amended() in
    # order["_push"]: amendResult, reqId, code, msg, the fields only OKX's orders push carries.

    fail_next_amend = None      # (code, msg): the next amend-order is accepted (sCode 0), then fails (amendResult -1)

    def amend_state(self, ord_id, key=KEY):
        """The push-only fields of an order as its last amendment left them: amendResult ("" none, "0" done,
        "-1" failed, "1" failed and canceled), reqId, code, msg."""
        with self._lock:
            return dict(PUSH_DEFAULTS, **self.accounts[key]["orders"][ord_id].get("_push", {}))

    @account_change()
    def _amended(self, account, order, result, req_id, code="0", msg=""):
        """Record an amendment's outcome on the order and push it on the private stream's orders channel."""
        order["_push"] = {"amendResult": result, "reqId": req_id, "code": code, "msg": msg}
        order["uTime"] = str(self.now_ms())
        self._order_event(account, order, amendResult=result, reqId=req_id, code=code, msg=msg)

    def _amend_reserve(self, account, inst, order, remaining, price):
        """What the unfilled `remaining` of an amended order freezes at `price`: (ccy, amount), or None."""
        if remaining <= 0:
            return None
        if inst["instType"] == "SPOT":
            base, quote = inst["instId"].split("-")
            return (quote, remaining * price) if order["side"] == "buy" else (base, remaining)
        if inst["instType"] == "OPTION":
            return self._option_reserve(account, inst, order["side"], order["tdMode"], remaining, price, "limit")
        position = account["positions"].get((inst["instId"], order["tdMode"], order["posSide"]))
        if self._is_closing(account, order):
            opening = Decimal(0)
        elif order["posSide"] == "net" and position and (position["pos"] > 0) != (order["side"] == "buy"):
            opening = max(Decimal(0), remaining - abs(position["pos"]))
        else:
            opening = remaining
        lever = account["leverage"].get((inst["instId"], order["tdMode"], order["posSide"]), DEFAULT_LEVER)
        return inst["settleCcy"], rounded(self._notional(inst, opening, price) / lever)

    def _check_amend(self, account, params):
        """Check an amend-order body: (order, the change to make), or OkxError."""
        inst = self._instrument(text_param(params, "instId"))
        ord_id = text_param(params, "ordId", required=False)
        cl_ord_id = text_param(params, "clOrdId", required=False)
        if not ord_id and not cl_ord_id:
            raise param_missing("ordId")
        cxl_on_fail = bool_param(params, "cxlOnFail")
        id_param(params, "reqId")
        new_sz = decimal_param(params, "newSz", required=False)
        new_px_text = text_param(params, "newPx", required=False)
        if new_sz is None and not new_px_text:
            raise OkxError(*AMEND_NOTHING)
        order = self._find_order(account, inst["instId"], ord_id, cl_ord_id)
        if order is None or order["state"] not in PENDING:
            raise OkxError(*ORDER_AMEND_GONE)
        if order["ordType"] == "market":
            raise OkxError("51506", "Order modification unavailable for the order type.")
        new_px = None
        if new_px_text:      # off the tick: 51000 "Parameter ... error", as OKX answers a px off the tick
            new_px = price_param(params, "newPx", Decimal(inst["tickSz"]))
        if new_sz is not None and new_sz % Decimal(inst["lotSz"]):
            raise OkxError("51121", "Order quantity must be a multiple of the lot size.")
        price = new_px if new_px is not None else Decimal(order["px"])
        target = new_sz if new_sz is not None else order["_target"]
        remaining = target - Decimal(order["accFillSz"])
        market = self._market[inst["instId"]]
        best = market["ask"] if order["side"] == "buy" else market["bid"]
        crosses = remaining > 0 and (price >= best if order["side"] == "buy" else price <= best)
        if crosses and order["ordType"] == "post_only":
            raise OkxError("51511", "Modification failed as the order price did not meet the requirement for "
                                    "Post Only.")
        reserve = self._amend_reserve(account, inst, order, remaining, price)
        if reserve:
            ccy, amount = reserve
            held = order["_reserve"][1] if order["_reserve"] and order["_reserve"][0] == ccy else 0
            if account["balances"].setdefault(ccy, [Decimal(0), Decimal(0)])[0] + held < amount:
                raise OkxError("51502", "Unable to edit order: insufficient balance or margin.")
        return order, {"sz": new_sz, "px": new_px, "target": target, "reserve": reserve, "best": best,
                       "crosses": crosses, "cxl_on_fail": cxl_on_fail}

    def _apply_amend(self, account, order, change, req_id):
        """Change the order: size, price, what it freezes; a size at or below what filled ends it filled;
        a price that now crosses the book fills the rest at once."""
        if order["_reserve"]:
            ccy, amount = order["_reserve"]
            account["balances"][ccy][0] += amount
            account["balances"][ccy][1] -= amount
            order["_reserve"] = None
        filled = Decimal(order["accFillSz"])
        if change["px"] is not None:
            order["px"] = fmt(change["px"])
        if change["sz"] is not None:
            order["sz"] = fmt(max(change["sz"], filled))
        order["_target"] = change["target"]
        if change["target"] <= filled:
            order.update(_target=filled, state="filled")
        elif change["reserve"]:
            ccy, amount = change["reserve"]
            account["balances"][ccy][0] -= amount
            account["balances"][ccy][1] += amount
            order["_reserve"] = change["reserve"]
        self._amended(account, order, "0", req_id)
        if order["state"] in PENDING and change["crosses"]:
            self._fill(account, order, order["_target"] - filled, change["best"])

    @account_change()               # what the order freezes changes with it: a balance push follows
    def _api_amend_order(self, call):
        in_time, params, account = self.now_ms() * 1000, call.params, call.account
        req_id = str(params.get("reqId", ""))
        try:
            order, change = self._check_amend(account, params)
        except OkxError as error:
            return self._trade_answer("1", {"clOrdId": str(params.get("clOrdId", "")),
                                            "ordId": str(params.get("ordId", "")), "reqId": req_id,
                                            "sCode": error.code, "sMsg": error.msg, "ts": str(self.now_ms())},
                                      in_time)
        answer = self._trade_answer("0", {"clOrdId": order["clOrdId"], "ordId": order["ordId"], "reqId": req_id,
                                          "sCode": "0", "sMsg": "", "ts": str(self.now_ms())}, in_time)
        failure, self.fail_next_amend = self.fail_next_amend, None
        if failure is None:
            self._apply_amend(account, order, change, req_id)
        elif change["cxl_on_fail"]:        # accepted, failed, and canceled as asked
            self._cancel(account, order)
            self._amended(account, order, "1", req_id, *failure)
        else:                              # accepted, then failed: the order is left as it was
            self._amended(account, order, "-1", req_id, *failure)
        return answer

    # -- batches --------------------------------------------------------------------------------------

    def _api_batch_orders(self, call):
        """Up to 20 place-order bodies, each through _place; one answer row each, in order."""
        in_time = self.now_ms() * 1000
        if not call.params:
            raise param_missing("instId")
        if len(call.params) > BATCH_MAX:
            raise OkxError("51111", "Maximum %d orders can be placed in bulk." % BATCH_MAX)
        rows = []
        for params in call.params:
            try:
                order = self._place(call.account, params, call.headers)
            except OkxError as error:
                rows.append({"clOrdId": str(params.get("clOrdId", "")), "ordId": "", "sCode": error.code,
                             "sMsg": error.msg, "tag": str(params.get("tag", "")), "ts": str(self.now_ms())})
            else:
                rows.append({"clOrdId": order["clOrdId"], "ordId": order["ordId"], "sCode": "0",
                             "sMsg": "Order placed", "tag": order["tag"], "ts": order["cTime"]})
        code, msg = bulk_code(rows)
        return {"code": code, "msg": msg, "data": rows, "inTime": str(in_time), "outTime": str(self.now_ms() * 1000)}

    def _cancel_one(self, account, params):
        """One item of cancel-batch-orders, as cancel-order treats it: its answer row."""
        ord_id, cl_ord_id = str(params.get("ordId", "")), str(params.get("clOrdId", ""))
        try:
            inst = self._instrument(text_param(params, "instId"))
            if not ord_id and not cl_ord_id:
                raise param_missing("ordId")
            order = self._find_order(account, inst["instId"], ord_id, cl_ord_id)
            if order is None or order["state"] not in PENDING:
                raise OkxError("51400", "Order cancellation failed as the order has been filled, canceled or does"
                                        " not exist.")
        except OkxError as error:
            return {"clOrdId": cl_ord_id, "ordId": ord_id, "sCode": error.code, "sMsg": error.msg,
                    "ts": str(self.now_ms())}
        self._cancel(account, order)
        return {"clOrdId": order["clOrdId"], "ordId": order["ordId"], "sCode": "0", "sMsg": "",
                "ts": str(self.now_ms())}

    def _api_cancel_batch_orders(self, call):
        in_time = self.now_ms() * 1000
        self._array_items(call, BATCH_MAX)
        rows = [self._cancel_one(call.account, params) for params in call.params]
        code, msg = bulk_code(rows)
        return {"code": code, "msg": msg, "data": rows, "inTime": str(in_time), "outTime": str(self.now_ms() * 1000)}

    # -- options --------------------------------------------------------------------------------------
    # A simple premium model. One contract is ctVal x ctMult of the settle coin; the premium of a fill is
    # px x sz x ctVal x ctMult in that coin, paid by the buyer and received by the seller at the fill, with
    # the taker fee charged on it. A buy order freezes its premium; a sell that opens a short freezes the
    # cover, sz x ctVal x ctMult of the coin, held by the short position until it is bought back. Positions
    # are net (signed pos) in either position mode; upl is (mark - avgPx) x size; eq does not add the
    # options' value (OKX's optVal), and options never expire, exercise or settle here. Only limit-type
    # orders: a market order gets 51066.

    def _option_reserve(self, account, inst, side, td_mode, sz, price, ord_type):
        """What an option order freezes: (settle coin, premium) for a buy, the cover of what a sell opens."""
        if ord_type == "market":
            raise OkxError("51066", "Market orders unavailable for options trading. Place a limit order to close "
                                    "position.")
        size = self._contract_size(inst)
        if side == "buy":
            return inst["settleCcy"], rounded(sz * size * price)
        position = account["positions"].get((inst["instId"], td_mode, "net"))
        held_long = max(position["pos"], Decimal(0)) if position else Decimal(0)
        return inst["settleCcy"], max(Decimal(0), sz - held_long) * size

    def _fill_option(self, account, inst, order, qty, price):
        """The money of an option fill: the premium changes hands, less the fee. Returns (fee, realised pnl)."""
        premium = qty * self._contract_size(inst) * price
        fee = rounded(premium * self.fee_rate)
        balance = account["balances"].setdefault(inst["settleCcy"], [Decimal(0), Decimal(0)])
        balance[0] += (premium if order["side"] == "sell" else -premium) - fee
        return fee, self._move_option_position(account, inst, order, qty, price)

    def _move_option_position(self, account, inst, order, qty, price):
        """Apply an option fill to the net position (the cover of shorts frozen and released); returns the
        realised profit, already in the balance through the premiums."""
        key = (inst["instId"], order["tdMode"], "net")
        position = account["positions"].get(key)
        if position is None:
            position = account["positions"][key] = {
                "instId": inst["instId"], "mgnMode": order["tdMode"], "posSide": "net", "pos": Decimal(0),
                "avgPx": price, "margin": Decimal(0), "realizedPnl": Decimal(0), "lever": Decimal(1),
                "posId": self._next_id(int(self.now_ms()) * 100000), "cTime": self.now_ms(), "uTime": self.now_ms()}
        buy, size, pnl = order["side"] == "buy", self._contract_size(inst), Decimal(0)
        balance = account["balances"].setdefault(inst["settleCcy"], [Decimal(0), Decimal(0)])
        against = position["pos"] != 0 and (position["pos"] > 0) != buy
        closing = min(qty, abs(position["pos"])) if against else Decimal(0)
        opening = qty - closing
        if closing:
            long = position["pos"] > 0
            pnl = (price - position["avgPx"]) * closing * size * (1 if long else -1)
            if not long:                   # buying back a short releases its share of the cover
                cover = rounded(position["margin"] * closing / abs(position["pos"]))
                position["margin"] -= cover
                balance[0] += cover
                balance[1] -= cover
            position["realizedPnl"] += pnl
            position["pos"] += closing if buy else -closing
        if opening:
            held = abs(position["pos"])
            position["avgPx"] = rounded((position["avgPx"] * held + price * opening) / (held + opening), 10)
            if not buy:
                position["margin"] += opening * size
                balance[0] -= opening * size
                balance[1] += opening * size
            position["pos"] += opening if buy else -opening
        position["uTime"] = self.now_ms()
        if position["pos"] == 0:
            del account["positions"][key]
        return pnl


# -- HTTP plumbing ------------------------------------------------------------------------------------------

def _drop_sockets(lock, sockets):
    """Shut down every tracked socket so that the threads serving them return at once."""
    with lock:
        open_sockets = list(sockets)
        sockets.clear()
    for sock in open_sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _reset(sock):
    """Close a socket with a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _FakeOKXServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    ssl_context = None

    def get_request(self):
        sock, address = super().get_request()
        if self.ssl_context is not None:      # the handshake itself runs in the handler's thread
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address):
        pass      # clients that hang up or reject the certificate are part of the tests


class _FakeOKXHandler(BaseHTTPRequestHandler):
    """Serves one connection for a FakeOKX: HTTP/1.1 keep-alive, Content-Length on every answer.

    Faults, taken in order by path prefix: `timeout` (no answer; the connection closes after 30 s or when
    the fake stops), `reset` (RST, no answer), `slow` (2 s delay, then a normal answer), the canned answers
    of CANNED_FAULTS, and `timeout_after_process` / `reset_after_process`, which first carry the request
    out (an order really is placed) and then hang or reset instead of answering.
    """

    protocol_version = "HTTP/1.1"
    server_version = "FakeOKX/1.0"
    disable_nagle_algorithm = True

    def setup(self):
        fake = self.server.fake
        with fake._lock:
            fake.connections += 1
            fake._sockets.add(self.request)
        try:
            if fake.handshake_ms:
                time.sleep(fake.handshake_ms / 1000)
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()
        except (OSError, ValueError):
            with fake._lock:
                fake._sockets.discard(self.request)
            raise
        super().setup()

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.server.fake._lock:
            self.server.fake._sockets.discard(self.request)

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._serve(self.command)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _hang(self, fake):
        fake._stopping.wait(30)
        self.close_connection = True

    def _serve(self, method):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        path, _, query = self.path.partition("?")
        with fake._lock:
            fake.requests.append({"method": method, "path": path, "query": query,
                                  "headers": dict(self.headers.items()), "body": body})
        if fake.latency_ms:
            time.sleep(fake.latency_ms / 1000)
        kind = fake._take_fault(path)
        if kind == "timeout":
            return self._hang(fake)
        if kind == "reset":
            self.close_connection = True
            return _reset(self.connection)
        if kind in CANNED_FAULTS:
            return self._send(*CANNED_FAULTS[kind])
        if kind == "slow":
            fake._stopping.wait(2)
        status, answer = fake._dispatch(method, self.path, self.headers, body, self.client_address[0])
        if kind == "timeout_after_process":
            return self._hang(fake)
        if kind == "reset_after_process":
            self.close_connection = True
            return _reset(self.connection)
        payload = json.dumps(answer, separators=(",", ":")).encode()
        if kind == "truncated_after_process":    # the answer breaks off after 11 bytes of its body
            self.close_connection = True
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:11])
            self.wfile.flush()
            return _reset(self.connection)
        self._send(status, "application/json", payload)

    def _send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# -- CONNECT proxy ------------------------------------------------------------------------------------------

class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass


class _ProxyHandler(socketserver.BaseRequestHandler):
    """One client of a FakeProxy: read the CONNECT request, check it, then relay bytes both ways."""

    def handle(self):
        proxy, client = self.server.proxy, self.request
        with proxy._lock:
            proxy._sockets.add(client)
        try:
            self._tunnel(proxy, client)
        finally:
            with proxy._lock:
                proxy._sockets.discard(client)

    @staticmethod
    def _reply(client, status, extra=""):
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        client.sendall(("HTTP/1.1 %d %s\r\n%sContent-Length: 0\r\nConnection: close\r\n\r\n"
                        % (status, phrase, extra)).encode("latin-1"))

    def _tunnel(self, proxy, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk or len(head) > 65536:
                return
            head += chunk
        head, _, early_bytes = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        auth = headers.get("proxy-authorization")
        with proxy._lock:
            if auth is not None:
                proxy.auth_seen.append(auth)
        if method.upper() != "CONNECT":
            return self._reply(client, 405)
        if proxy.refuse_status:
            return self._reply(client, proxy.refuse_status)
        if proxy.user is not None and auth != proxy.expected_auth:
            return self._reply(client, 407, 'Proxy-Authenticate: Basic realm="fake-proxy"\r\n')
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except (OSError, ValueError):
            return self._reply(client, 502)
        upstream.settimeout(None)
        with proxy._lock:
            proxy.tunnels += 1
            proxy._sockets.add(upstream)
        try:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early_bytes:
                upstream.sendall(early_bytes)
            self._relay(client, upstream)
        finally:
            with proxy._lock:
                proxy._sockets.discard(upstream)
            upstream.close()

    @staticmethod
    def _relay(client, upstream):
        peers = {client: upstream, upstream: client}
        while True:
            readable, _, _ = select.select(list(peers), [], [], 1.0)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                except OSError:
                    return


class FakeProxy(_BackgroundServer):
    """An HTTP CONNECT proxy on 127.0.0.1 for the proxy tests.

    With `user`/`password` it answers `407 Proxy Authentication Required` (and `Proxy-Authenticate: Basic`)
    to a CONNECT without those Basic credentials; with `refuse_status` (e.g. 403 or 502) it refuses every
    CONNECT with that status. After `200 Connection established` it relays bytes until either side closes.
    `url` has no credentials; `tunnels` counts accepted CONNECTs; `auth_seen` lists the
    Proxy-Authorization headers received.
    """

    def __init__(self, user=None, password=None, refuse_status=None):
        self.user, self.password, self.refuse_status = user, password, refuse_status
        credentials = "%s:%s" % (user, password or "")
        self.expected_auth = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.tunnels = 0
        self.auth_seen = []
        self._lock = threading.Lock()
        self._sockets = set()
        self._server = None

    def start(self):
        server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        server.proxy = self
        return self._serve(server)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self._server.server_address[1]


# -- a direct OKX client, for tests of the fake ----------------------------------------------------------

def okx_request(base_url, method, request_path, body=None, key=KEY, secret=None, passphrase=None,
                timestamp=None, simulated=None, signed=True, headers=None, proxy=None, cafile=None, timeout=5):
    """Send one request straight to a FakeOKX and return (HTTP status, parsed JSON or the raw text).

    `request_path` includes the query string; `body` is a dict (sent as compact JSON) or a string.
    Signed requests use the secret and passphrase of `key` unless given; `simulated` defaults to
    whether `key` is DEMO_KEY. `proxy` is a proxy url to tunnel through (`http://user:password@host:port`
    sends Basic credentials); `cafile` trusts an https fake. A refused CONNECT raises OSError.
    """
    known = {KEY: (SECRET, PASSPHRASE), DEMO_KEY: (DEMO_SECRET, DEMO_PASSPHRASE)}.get(key, ("", ""))
    secret = known[0] if secret is None else secret
    passphrase = known[1] if passphrase is None else passphrase
    text = body if isinstance(body, str) or body is None else json.dumps(body, separators=(",", ":"))
    send_headers = {"Content-Type": "application/json"} if method != "GET" else {}
    if signed:
        timestamp = timestamp or okx_timestamp()
        send_headers.update({"OK-ACCESS-KEY": key, "OK-ACCESS-PASSPHRASE": passphrase, "OK-ACCESS-TIMESTAMP": timestamp,
                             "OK-ACCESS-SIGN": sign_okx(secret, timestamp, method, request_path, text or "")})
    if simulated if simulated is not None else key == DEMO_KEY:
        send_headers["x-simulated-trading"] = "1"
    send_headers.update(headers or {})
    target = urllib.parse.urlsplit(base_url)
    connect_to = urllib.parse.urlsplit(proxy) if proxy else target
    if target.scheme == "https":
        context = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection(connect_to.hostname, connect_to.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(connect_to.hostname, connect_to.port, timeout=timeout)
    if proxy:
        tunnel_headers = {}
        if connect_to.username is not None:
            credentials = "%s:%s" % (urllib.parse.unquote(connect_to.username),
                                     urllib.parse.unquote(connect_to.password or ""))
            tunnel_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        conn.set_tunnel(target.hostname, target.port, headers=tunnel_headers)
    try:
        conn.request(method, request_path, body=text.encode() if text is not None else None, headers=send_headers)
        response = conn.getresponse()
        raw = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


# ---- Fake OKX stream ----

PUBLIC_PATH = "/ws/v5/public"
CHANNELS = ("tickers", "books5", "books", "trades")
DEFAULT_INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "LTC-USDT",
                       "BTC-USDT-SWAP", "ETH-USDT-SWAP", "BTC-USD-SWAP")
# base currency -> (reference price, tick size) around which a generated book is centred
_PRICE_TICK = {"BTC": ("43000", "0.1"), "ETH": ("2922", "0.01"), "LTC": ("70", "0.01")}
BOOK_DEPTH = 60          # generated levels per side
SNAPSHOT_DEPTH = 400     # levels per side in a `books` snapshot (OKX's v5 docs)
CHECKSUM_DEPTH = 25      # levels per side in the check string (OKX's v5 docs)
MAX_MESSAGE = 1 << 20    # larger client messages are closed with 1009
NOT_FOUND_MSG = ("Wrong URL or channel:{channel},instId:{inst_id} doesn't exist. "
                 "Please use the correct URL, channel and parameters referring to API document.")
NOTICE_64008_MSG = "The connection will soon be closed for a service upgrade. Please reconnect."

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
_POLL_S = 0.1            # how often a waiting reader looks at the stop/idle/close flags
_IO_TIMEOUT_S = 5.0      # socket timeout (TLS handshake, sends to a client that stopped reading)
_CLOSE_WAIT_S = 1.0      # after sending a close frame, wait this long for the client's echo


def websocket_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def okx_book_checksum(bids, asks) -> int:
    """OKX's order-book checksum (OKX's v5 docs): signed CRC32 of the 25+25 best levels.

    ``bids`` / ``asks`` are sequences of ``[px, sz, ...]`` string rows, best first. The check
    string alternates ``bidPx:bidSz:askPx:askSz`` level by level; when one side runs out the
    other continues alone. Strings are used exactly as given (never via float).
    """
    bids, asks = list(bids)[:CHECKSUM_DEPTH], list(asks)[:CHECKSUM_DEPTH]
    parts = []
    for i in range(max(len(bids), len(asks))):
        if i < len(bids):
            parts += [bids[i][0], bids[i][1]]
        if i < len(asks):
            parts += [asks[i][0], asks[i][1]]
    value = zlib.crc32(":".join(parts).encode("ascii"))
    return value - (1 << 32) if value >= (1 << 31) else value


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask_key=None) -> bytes:
    """One RFC 6455 frame; masked when ``mask_key`` (4 bytes) is given (client -> server)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask_key else 0
    length = len(payload)
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if mask_key:
        head += mask_key
        payload = _xor_mask(payload, mask_key)
    return bytes(head) + payload


def _xor_mask(data: bytes, key: bytes) -> bytes:
    """Apply (or remove) a 4-byte WebSocket mask."""
    if not data:
        return b""
    stream = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def _fmt(value: Decimal) -> str:
    """Plain decimal string without exponent or trailing zeros, as OKX writes numbers."""
    return format(value.normalize(), "f")


def _now_ms() -> str:
    return str(int(time.time() * 1000))


def _book_row(px: str, sz: str) -> list:
    """A `books`/`books5` row ``[px, sz, "0", numOrders]`` (third element deprecated, "0")."""
    return [px, sz, "0", "0" if Decimal(sz) == 0 else "1"]


class _ConnectionDone(Exception):
    """The peer went away, the server stops, or our close handshake timed out."""


class _ProtocolError(Exception):
    """The client broke RFC 6455: close the connection with ``code``."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


# ======== Market state ====================================================================

class _Market:
    """One instrument: ticker row, full book (px string -> sz string per side), seqId, trades.

    The book is generated deterministically from the instrument name: ``BOOK_DEPTH`` levels per
    side one tick apart, best bid at the reference price, best ask one tick above.
    """

    def __init__(self, inst_id: str, ts: str = ""):
        price, tick = (Decimal(v) for v in _PRICE_TICK.get(inst_id.split("-")[0], ("100", "0.01")))
        rng = random.Random(inst_id)          # str seeds are stable across runs and hash seeds
        contracts = inst_id.endswith("-SWAP")

        def size():
            if contracts:
                return str(rng.randint(1, 500))
            return _fmt(Decimal(rng.randint(1, 20000)) / 1000)

        self.inst_id = inst_id
        self.bids = {_fmt(price - tick * i): size() for i in range(BOOK_DEPTH)}
        self.asks = {_fmt(price + tick * (i + 1)): size() for i in range(BOOK_DEPTH)}
        self.seq_id = 1000 + rng.randint(0, 8999)
        self.next_trade_id = 100000000 + rng.randint(0, 8999999)
        self.trades = collections.deque(maxlen=100)      # newest first

        def scaled(factor):
            return _fmt((price * Decimal(factor)).quantize(tick))

        (bid_px, bid_sz), (ask_px, ask_sz) = self.levels("bids", 1)[0], self.levels("asks", 1)[0]
        self.ticker = {
            "instType": "SWAP" if contracts else "SPOT", "instId": inst_id,
            "last": _fmt(price), "lastSz": "1" if contracts else "0.01",
            "askPx": ask_px, "askSz": ask_sz, "bidPx": bid_px, "bidSz": bid_sz,
            "open24h": scaled("0.98"), "high24h": scaled("1.02"), "low24h": scaled("0.97"),
            "volCcy24h": _fmt((price * Decimal("8123.45")).quantize(Decimal("0.01"))),
            "vol24h": "8123.45", "sodUtc0": scaled("0.99"), "sodUtc8": scaled("0.985"),
            "ts": ts or _now_ms(),
        }

    def levels(self, side: str, depth=None) -> list:
        """``[[px, sz], ...]`` best first (bids descending, asks ascending)."""
        book = self.bids if side == "bids" else self.asks
        prices = sorted(book, key=Decimal, reverse=(side == "bids"))
        return [[px, book[px]] for px in prices[:depth]]

    def top5(self):
        return self.levels("bids", 5), self.levels("asks", 5)

    def apply(self, side: str, px: str, sz: str) -> None:
        """Set level ``px`` to ``sz`` (size "0" deletes); an equal price in another spelling is replaced."""
        book = self.bids if side == "bids" else self.asks
        for key in [k for k in book if Decimal(k) == Decimal(px)]:
            del book[key]
        if Decimal(sz) != 0:
            book[px] = sz

    def checksum(self) -> int:
        return okx_book_checksum(self.levels("bids", CHECKSUM_DEPTH), self.levels("asks", CHECKSUM_DEPTH))


# ======== One client connection ===========================================================

class _Connection:
    """One accepted client: handshake, then a frame loop; the server sends through it."""

    def __init__(self, server: "FakeOKXStream", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.conn_id = "%08x" % random.getrandbits(32)
        self.subs = set()                 # {(channel, instId)}
        self.path = None                  # PUBLIC_PATH or PRIVATE_PATH, from the handshake
        self.api_key = None               # private: the key of the successful login
        self.private_subs = []            # private: the subscribed args, in order
        self.handshaken = False
        self.dead = False                 # aborted or finished
        self.close_deadline = None        # set once we sent a close frame
        self.last_recv = server.clock.monotonic()    # the idle rule runs on the stream's clock
        self._pending = b""
        self._send_lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.handshaken and not self.dead and self.close_deadline is None

    def run(self) -> None:
        try:
            self.sock.settimeout(_IO_TIMEOUT_S)
            if self.server.ssl_context is not None:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            if self._handshake():
                try:
                    self._serve()
                except _ProtocolError as exc:
                    self.send_close(exc.code, exc.reason)
                    while True:                       # discard until EOF or the close wait ends
                        self._recv_exact(1)
        except (_ConnectionDone, OSError, ValueError):
            pass
        finally:
            self.dead = True
            with self.server._lock:
                self.server._conns.discard(self)
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- reading ------------------------------------------------------------------------------

    def _recv_some(self) -> bytes:
        """Wait for input (looking at the stop/close/idle flags every _POLL_S); raise at EOF."""
        while True:
            now = time.monotonic()
            if self.dead or self.server._stopping.is_set():
                raise _ConnectionDone()
            if self.close_deadline is not None and now > self.close_deadline:
                raise _ConnectionDone()
            if (self.close_deadline is None and self.handshaken and self.server.idle_close_s is not None
                    and self.server.clock.monotonic() - self.last_recv > self.server.idle_close_s):
                self.send_close(4004, "No data received in 30s")
            tls_buffered = getattr(self.sock, "pending", lambda: 0)()
            if tls_buffered or select.select([self.sock], [], [], _POLL_S)[0]:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise _ConnectionDone()
                self.last_recv = self.server.clock.monotonic()
                return chunk

    def _recv_exact(self, count: int) -> bytes:
        while len(self._pending) < count:
            self._pending += self._recv_some()
        data, self._pending = self._pending[:count], self._pending[count:]
        return data

    def _handshake(self) -> bool:
        """Read the HTTP upgrade request; answer 101 (True) or an HTTP error (False)."""
        while b"\r\n\r\n" not in self._pending:
            if len(self._pending) > 16384:
                return self._reject("400 Bad Request")
            self._pending += self._recv_some()
        head, _, self._pending = self._pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if len(request) != 3 or request[0] != "GET":
            return self._reject("400 Bad Request")
        self.path = request[1].split("?")[0]
        if self.path not in self.server.paths:
            return self._reject("404 Not Found")
        key = headers.get("sec-websocket-key", "")
        connection_tokens = [t.strip().lower() for t in headers.get("connection", "").split(",")]
        if (headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection_tokens
                or not _valid_key(key)):
            return self._reject("400 Bad Request")
        if headers.get("sec-websocket-version") != "13":
            return self._reject("426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n")
        accept = websocket_accept(key + ("-wrong" if self.server.bad_accept else ""))
        with self.server._lock:       # no push can slip in before the 101
            self.handshaken = True
            self.server.connections_total += 1
            self._send_raw(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                            "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
        return True

    def _reject(self, status: str, extra_headers: str = "") -> bool:
        body = status.encode()
        self._send_raw(("HTTP/1.1 %s\r\n%sContent-Type: text/plain\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n" % (status, extra_headers, len(body))).encode() + body)
        return False

    def _read_frame(self):
        """One client frame as ``(fin, opcode, payload)``, unmasked; RFC violations raise."""
        first, second = self._recv_exact(2)
        fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        if first & 0x70:
            raise _ProtocolError(1002, "reserved bits set")
        if opcode not in _KNOWN_OPCODES:
            raise _ProtocolError(1002, "unknown opcode")
        if length == 126:
            length = struct.unpack("!H", self._recv_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._recv_exact(8))[0]
        if not second & 0x80:
            raise _ProtocolError(1002, "client frames must be masked")
        if opcode >= OP_CLOSE and (length > 125 or not fin):
            raise _ProtocolError(1002, "bad control frame")
        if length > MAX_MESSAGE:
            raise _ProtocolError(1009, "message too big")
        mask_key = self._recv_exact(4)
        return fin, opcode, _xor_mask(self._recv_exact(length), mask_key)

    def _serve(self) -> None:
        """Frame loop: answer control frames, reassemble fragments, hand messages to the server."""
        message_opcode, fragments = None, []
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == OP_CLOSE:
                if len(payload) == 1:
                    raise _ProtocolError(1002, "bad close payload")
                code = struct.unpack("!H", payload[:2])[0] if payload else None
                self.send_close(code)        # echo (no-op when we started the close)
                return
            if opcode == OP_PING:
                self.send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CONT:
                if message_opcode is None:
                    raise _ProtocolError(1002, "continuation without a message")
            elif message_opcode is not None:
                raise _ProtocolError(1002, "new message inside a fragmented one")
            else:
                message_opcode = opcode
            fragments.append(payload)
            if sum(len(f) for f in fragments) > MAX_MESSAGE:
                raise _ProtocolError(1009, "message too big")
            if fin:
                data, done_opcode = b"".join(fragments), message_opcode
                message_opcode, fragments = None, []
                if done_opcode == OP_TEXT and self.close_deadline is None:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _ProtocolError(1007, "invalid UTF-8")
                    self.server._on_text(self, text)
                # binary messages are ignored: OKX's public stream speaks JSON text only

    # -- sending ------------------------------------------------------------------------------

    def _send_raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.abort()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """A data or pong frame; dropped while the server is silent or this connection closes."""
        if self.server.answer_pings and self.close_deadline is None and not self.dead:
            self._send_raw(encode_frame(opcode, payload))

    def send_json(self, message: dict) -> None:
        self.send_frame(OP_TEXT, json.dumps(message, separators=(",", ":")).encode("utf-8"))

    def send_close(self, code=None, reason: str = "") -> None:
        """Send a close frame once, then wait (in the reader) for the echo or the deadline."""
        if self.close_deadline is not None or self.dead:
            return
        self.close_deadline = time.monotonic() + _CLOSE_WAIT_S
        payload = b"" if code is None else struct.pack("!H", code) + reason.encode("utf-8")
        self._send_raw(encode_frame(OP_CLOSE, payload))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame; the reader thread then exits."""
        self.dead = True
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RDWR)


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


# ======== Private channels (OKX's v5 docs) ===================================================

PRIVATE_PATH = "/ws/v5/private"
LOGIN_VERIFY_PATH = "/users/self/verify"     # the fixed path of the login prehash (OKX's v5 docs)
LOGIN_WINDOW_MS = 30000                      # a login timestamp further than this from OKX's clock: 60006
# channel -> the instType values it takes (None: no instType argument)
PRIVATE_CHANNELS = {
    "account": None,
    "positions": ("MARGIN", "SWAP", "FUTURES", "OPTION", "ANY"),
    "orders": ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION", "ANY"),
}
LOGIN_ERRORS = {
    "60004": "Invalid timestamp", "60005": "Invalid apiKey", "60006": "Timestamp request expired",
    "60007": "Invalid sign", "60009": "Login failed.", "60023": "Bulk login requests too frequent",
    "60024": "Wrong passphrase", "60031": "The WebSocket endpoint does not allow multiple or repeated logins",
    "60032": "API key doesn't exist", "50101": "APIKey does not match current environment.",
    "63999": "Login failed due to internal error. Please try again later.",
}
PRIVATE_NOT_FOUND_MSG = ("Wrong URL or channel:{channel} doesn't exist. "
                         "Please use the correct URL, channel and parameters referring to API document.")
PUSH_BEFORE_ANSWER_S = 0.05    # real seconds between an order push and the REST answer (push_before_answer)
_DELIVERY_POLL_S = 0.005       # real seconds between looks of the push sender at the clock
_WHOLE_SECONDS = re.compile(r"^[0-9]+$")


def ws_login_sign(secret: str, timestamp) -> str:
    """The login `sign`: Base64(HMAC-SHA256(secret, timestamp + "GET" + "/users/self/verify"))."""
    return sign_okx(secret, str(timestamp), "GET", LOGIN_VERIFY_PATH)


def ws_login_request(key: str = KEY, secret=None, passphrase=None, timestamp=None) -> dict:
    """The private stream's login op for `key`, signed with its secret (and passphrase) unless given;
    `timestamp` (string or int seconds) defaults to the real clock's seconds now."""
    known = {KEY: (SECRET, PASSPHRASE), DEMO_KEY: (DEMO_SECRET, DEMO_PASSPHRASE)}.get(key, ("", ""))
    secret = known[0] if secret is None else secret
    passphrase = known[1] if passphrase is None else passphrase
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    return {"op": "login", "args": [{"apiKey": key, "passphrase": passphrase, "timestamp": timestamp,
                                     "sign": ws_login_sign(secret, timestamp)}]}


class _PrivateChannels:
    """``/ws/v5/private`` of FakeOKXStream, mirroring the accounts of its FakeOKX (``okx``).

    A connection logs in (OKX's v5 docs) and subscribes to `account` (optional ``ccy``), `positions`
    (``instType`` MARGIN/SWAP/FUTURES/OPTION/ANY; optional ``instFamily``, ``instId``) and `orders`
    (``instType`` also SPOT; same filters). `account` and `positions` answer a subscribe with a
    snapshot, `orders` with nothing; then every change of the account that FakeOKX reports to its
    observers is pushed: `orders` rows one by one, then `account`, then `positions` (``event_update``).
    Pushes go through an outbox that a sender thread empties in order once each push is due on the
    stream's clock (``push_delay_s``); acks, errors and login answers are written at once.
    """

    # -- introspection ------------------------------------------------------------------------

    @property
    def paths(self) -> tuple:
        """The handshake paths served: /ws/v5/public, and /ws/v5/private when bound to a FakeOKX."""
        return (PUBLIC_PATH,) if self.okx is None else (PUBLIC_PATH, PRIVATE_PATH)

    @property
    def open_private_connections(self) -> int:
        with self._lock:
            return sum(1 for conn in self._conns if conn.is_open and conn.path == PRIVATE_PATH)

    def private_subscriptions(self, api_key=None):
        """``{api key: [subscribed args, in order]}`` over the open logged-in private connections, or
        the list of one key's args."""
        found = {}
        with self._lock:
            for conn in self._conns:
                if conn.is_open and conn.path == PRIVATE_PATH and conn.api_key is not None:
                    found.setdefault(conn.api_key, []).extend(dict(arg) for arg in conn.private_subs)
        return found if api_key is None else found.get(api_key, [])

    # -- requests -----------------------------------------------------------------------------

    def _on_private_request(self, conn, request, text: str) -> None:
        # Lock order: the fake's, then the stream's (FakeOKX calls its observers under its own lock).
        with self.okx._lock, self._lock:
            self.received.append(request if isinstance(request, dict) else text)
            self._handle_private_request(conn, request, text)

    def _handle_private_request(self, conn, request, text: str) -> None:
        reply = self._reply_to(conn, request)
        if not isinstance(request, dict) or "op" not in request:
            return reply(event="error", code="60012", msg="Invalid request: " + text)
        op, args = request["op"], request.get("args")
        if op == "login":
            return self._login(conn, args, text, reply)
        if op not in ("subscribe", "unsubscribe"):       # OKX's WebSocket order ops are not faked
            return reply(event="error", code="60019", msg="Invalid op: %s" % (op,))
        if conn.api_key is None:
            return reply(event="error", code="60011", msg="Please log in")
        if not isinstance(args, list) or not args or not all(isinstance(a, dict) for a in args):
            return reply(event="error", code="60012", msg="Invalid request: " + text)
        for arg in args:
            refusal = self._arg_refusal(arg, text)
            if refusal:
                reply(event="error", code=refusal[0], msg=refusal[1])
                continue
            arg = dict(arg)
            if op == "unsubscribe":
                if arg in conn.private_subs:
                    conn.private_subs.remove(arg)
                reply(event="unsubscribe", arg=arg)
                continue
            if arg not in conn.private_subs:
                conn.private_subs.append(arg)
            reply(event="subscribe", arg=dict(arg))
            count = sum(1 for other in self._conns if other.is_open and other.api_key == conn.api_key
                        and any(sub["channel"] == arg["channel"] for sub in other.private_subs))
            conn.send_json({"event": "channel-conn-count", "channel": arg["channel"], "connCount": str(count),
                            "connId": conn.conn_id})
            self._queue_snapshot(conn, arg)

    @staticmethod
    def _arg_refusal(arg: dict, text: str):
        """None for a valid private-channel arg, else (code, msg)."""
        channel = arg.get("channel")
        if channel not in PRIVATE_CHANNELS:
            return "60018", PRIVATE_NOT_FOUND_MSG.format(channel=channel)
        inst_types = PRIVATE_CHANNELS[channel]
        # A missing or unknown instType: OKX's code is not documented; 60012 as for a malformed request
        # (UNCONFIRMED).
        if inst_types is not None and arg.get("instType") not in inst_types:
            return "60012", "Invalid request: " + text
        if any(not isinstance(arg.get(name, ""), str) for name in ("ccy", "instFamily", "instId")):
            return "60012", "Invalid request: " + text
        return None

    def _login(self, conn, args, text: str, reply) -> None:
        arg = args[0] if isinstance(args, list) and args and isinstance(args[0], dict) else {}
        api_key = arg.get("apiKey") if isinstance(arg.get("apiKey"), str) else ""
        code, msg = self._login_refusal(conn, args, arg, text)
        self.logins.append((api_key, code))
        if code != "0":            # the connection stays open: closing it is the client's business
            return reply(event="error", code=code, msg=msg)
        conn.api_key = api_key
        reply(event="login", code="0", msg="")

    def _login_refusal(self, conn, args, arg: dict, text: str):
        """("0", "") for a good login, else OKX's (code, msg), checked in the order OKX's v5 docs give."""
        if self.refuse_logins:
            return self.refuse_logins, LOGIN_ERRORS.get(self.refuse_logins, "Login failed.")
        if conn.api_key is not None:
            return "60031", LOGIN_ERRORS["60031"]
        if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict)) or any(
                not isinstance(arg.get(name), str) or not arg[name] for name in ("apiKey", "passphrase", "sign")):
            return "60012", "Invalid request: " + text
        stamp = arg.get("timestamp")
        if stamp is None or stamp == "":
            return "60012", "Invalid request: " + text
        # Seconds as a string (the docs, ccxt) or a JSON integer (python-okx). Fractional seconds are
        # UNCONFIRMED at OKX: refused here as malformed, like any other non-integer.
        if isinstance(stamp, bool) or not isinstance(stamp, (int, str)) or not _WHOLE_SECONDS.match(str(stamp)):
            return "60004", LOGIN_ERRORS["60004"]
        # OKX: "the request will expire 30 seconds after the timestamp"; one that far in the future is
        # refused too, as on REST (UNCONFIRMED). Milliseconds are thus far off: 60006, as OKX answers.
        if abs(int(stamp) * 1000 - self.okx.now_ms()) > LOGIN_WINDOW_MS:
            return "60006", LOGIN_ERRORS["60006"]
        account = self.okx.accounts.get(arg["apiKey"])
        if account is None:
            return "60032", LOGIN_ERRORS["60032"]
        if account["demo"] != self.demo:
            return "50101", LOGIN_ERRORS["50101"]
        if arg["passphrase"] != account["passphrase"]:
            return "60024", LOGIN_ERRORS["60024"]
        if not hmac.compare_digest(ws_login_sign(account["secret"], stamp), arg["sign"]):
            return "60007", LOGIN_ERRORS["60007"]
        return "0", ""

    # -- pushes -------------------------------------------------------------------------------

    def _push_arg(self, conn, arg: dict) -> dict:
        return dict(arg, uid=self.okx.accounts[conn.api_key]["uid"])

    def _in_scope(self, arg: dict, row: dict) -> bool:
        """Whether a positions/orders row is one the subscription `arg` covers."""
        inst = self.okx._instruments.get(row["instId"], {})
        return (arg.get("instType", "ANY") in ("ANY", row["instType"])
                and arg.get("instFamily", "") in ("", inst.get("instFamily"))
                and arg.get("instId", "") in ("", row["instId"]))

    def _account_data(self, arg: dict, data: dict):
        """`data` (a /account/balance object) with only the details `arg`'s ccy covers (None if none)."""
        ccy = arg.get("ccy", "")
        if not ccy:
            return data
        details = [row for row in data["details"] if row["ccy"] == ccy]
        return dict(data, details=details) if details else None

    def _queue_snapshot(self, conn, arg: dict) -> None:
        """The full `account` / `positions` snapshot of the subscription `arg` (nothing for `orders`)."""
        account = self.okx.accounts[conn.api_key]
        if arg["channel"] == "account":
            data = self._account_data(arg, self.okx._api_balance(Call({}, account, {}))[0])
            rows = [data] if data is not None else []
        elif arg["channel"] == "positions":
            stamp = str(self.okx.now_ms())
            rows = [dict(row, pTime=stamp) for row in self.okx._api_positions(Call({}, account, {}))
                    if self._in_scope(arg, row)]
        else:
            return
        self._queue(conn, arg, {"arg": self._push_arg(conn, arg), "eventType": "snapshot", "curPage": 1,
                                "lastPage": True, "data": rows})

    def push_snapshots(self, api_key=None) -> None:
        """Send the regular full `account` and `positions` snapshots now (of one key, or of all)."""
        with self.okx._lock, self._lock:
            for conn in list(self._conns):
                if conn.is_open and conn.api_key is not None and api_key in (None, conn.api_key):
                    for arg in conn.private_subs:
                        self._queue_snapshot(conn, arg)

    def _on_account_event(self, api_key: str, kind: str, rows: list) -> None:
        """FakeOKX's observer (called under its lock): queue the pushes of one reported change."""
        stamp, at_once = str(self.okx.now_ms()), []
        with self._lock:
            for conn in list(self._conns):
                if not (conn.is_open and conn.path == PRIVATE_PATH and conn.api_key == api_key):
                    continue
                for arg in list(conn.private_subs):
                    if arg["channel"] != kind:
                        continue
                    push_arg = self._push_arg(conn, arg)
                    if kind == "orders":
                        for row in rows:
                            if self._in_scope(arg, row):
                                copies = [row]
                                if self.duplicate_pushes:
                                    copies.append(dict(row, uTime=str(int(row["uTime"]) + 1)))
                                for copy in copies:
                                    at_once.append(self._queue(conn, arg, {"arg": push_arg, "data": [dict(copy)]},
                                                               at_once=self.push_before_answer))
                    elif kind == "account":
                        data = self._account_data(arg, rows[0])
                        if data is not None:
                            self._queue(conn, arg, {"arg": push_arg, "eventType": "event_update", "data": [data]})
                    elif kind == "positions":
                        changed = [dict(row, pTime=stamp) for row in rows if self._in_scope(arg, row)]
                        if changed:
                            self._queue(conn, arg, {"arg": push_arg, "eventType": "event_update",
                                                    "data": changed})
        if at_once and self.push_before_answer:
            self._deliver(until=at_once[-1])       # written now, in order behind what was queued before
            time.sleep(PUSH_BEFORE_ANSWER_S)

    # -- the outbox ---------------------------------------------------------------------------

    def _queue(self, conn, arg: dict, message: dict, at_once: bool = False) -> list:
        """Queue a push for `conn` (dropped at delivery if `arg` is no longer subscribed there), due
        push_delay_s from now on the clock (or at once); returns the outbox entry."""
        entry = [None if at_once else self.clock.monotonic() + max(0.0, self.push_delay_s), conn, arg, message]
        with self._lock:
            self._outbox.append(entry)
        with self._outbox_ready:
            self._outbox_ready.notify()
        return entry

    def _deliver(self, until=None) -> None:
        """Send the due pushes in order (and, with `until`, everything up to that entry)."""
        with self._deliver_lock:
            while True:
                with self._lock:
                    if not self._outbox:
                        return
                    entry = self._outbox[0]
                    due, conn, arg, message = entry
                    if until is None and due is not None and due > self.clock.monotonic():
                        return
                    self._outbox.popleft()
                    wanted = conn.is_open and arg in conn.private_subs
                if wanted:
                    conn.send_json(message)
                if entry is until:
                    return

    def _deliver_loop(self) -> None:
        while not self._stopping.is_set():
            with self._outbox_ready:
                self._outbox_ready.wait(_DELIVERY_POLL_S)
            self._deliver()


# ======== The server ======================================================================

class FakeOKXStream(_PrivateChannels):
    """Fake ``wss://ws.okx.com:8443/ws/v5/public`` on 127.0.0.1 (``ws://``, or TLS with a context).

    Settings (plain attributes, change them any time):
      ``instruments``  set of instIds accepted by subscribe (others -> error 60018);
      ``checksums``    True: `books` carry the real CRC32; False: always 0 (OKX since 2026-06);
      ``answer_pings`` False: the server goes silent (no pong, ack, push or pong frame) while
                       still reading and recording requests: a dead-but-open connection;
      ``idle_close_s`` None, or seconds (of ``clock``) without any received byte before close 4004;
      ``bad_accept``   True: the handshake answers a wrong ``Sec-WebSocket-Accept``;
      ``send_update_without_snapshot_next``  True: the next `books` subscribe gets an
                       ``update`` (a no-change re-send of the best bid) instead of a snapshot.
    Introspection: ``connections_total``, ``open_connections``, ``subscriptions()``,
    ``received`` (parsed JSON requests; raw text for "ping" and non-JSON), ``pings_received``.
    All state is behind one lock; mutators push synchronously from the caller's thread.

    With ``okx=`` a FakeOKX it also serves ``/ws/v5/private`` (see _PrivateChannels), live keys only,
    or demo keys only with ``demo=True``. Its settings, delays in seconds of ``clock`` (default: the
    FakeOKX's clock):
      ``push_delay_s``       hold every private push this long (a sender thread releases them in order);
      ``duplicate_pushes``   True: each `orders` push is sent twice, the second with uTime + 1 ms;
      ``push_before_answer`` True: an `orders` push is written, then ~50 ms of real time pass, before
                             the REST answer of the change leaves the fake (else pushes race it);
      ``refuse_logins``      None, or a code string that every login gets (e.g. "60009", "63999");
      ``answer_pings`` False silences private connections as public ones (no pong, ack or push).
    Introspection: ``logins`` ([(apiKey, code)], "0" for success), ``open_private_connections``,
    ``private_subscriptions()``; ``push_snapshots()`` sends the regular snapshots now.
    """

    def __init__(self, ssl_context=None, okx=None, demo=False, clock=None):
        self.ssl_context = ssl_context
        self.okx = okx                  # the FakeOKX whose accounts /ws/v5/private serves (None: public only)
        self.demo = demo                # OKX decides demo by host: True serves only demo keys, False live ones
        self.clock = clock if clock is not None else (okx.clock if okx is not None else REAL_CLOCK)
        self.push_delay_s = 0.0
        self.duplicate_pushes = False
        self.push_before_answer = False
        self.refuse_logins = None
        self.logins = []
        self._outbox = deque()          # [due monotonic or None, conn, arg, message] of private pushes
        self._outbox_ready = threading.Condition(threading.Lock())
        self._deliver_lock = threading.Lock()
        self.instruments = set(DEFAULT_INSTRUMENTS)
        self.checksums = True
        self.answer_pings = True
        self.idle_close_s = None
        self.bad_accept = False
        self.send_update_without_snapshot_next = False
        self.received = []
        self.pings_received = 0
        self.connections_total = 0
        self.port = None
        self.url = None
        self._lock = threading.RLock()
        self._markets = {}
        self._conns = set()
        self._threads = []
        self._listener = None
        self._stopping = threading.Event()
        self._rng = random.Random()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "FakeOKXStream":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.url = "%s://127.0.0.1:%d" % ("wss" if self.ssl_context else "ws", self.port)
        self._spawn(self._accept_loop, "fake-okx-accept")
        if self.okx is not None:
            self.okx.observers.append(self._on_account_event)
            self._spawn(self._deliver_loop, "fake-okx-push")
        return self

    def stop(self) -> None:
        """Abort every connection (no close frame), close the listener, join the threads."""
        self._stopping.set()
        if self.okx is not None and self._on_account_event in self.okx.observers:
            self.okx.observers.remove(self._on_account_event)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept() on Linux
            self._listener.close()
        self.kill_connections()
        deadline = time.monotonic() + 2.0
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FakeOKXStream":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # as OKX: frames leave at once
            conn = _Connection(self, sock)
            with self._lock:
                self._conns.add(conn)
            self._spawn(conn.run, "fake-okx-conn")

    def _stamp(self) -> str:
        """Now on the stream's clock (its true time), as the ms string of OKX's ``ts`` fields."""
        return str(int(self.clock.true_time() * 1000))

    # -- introspection ------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for conn in self._conns if conn.is_open)

    def subscriptions(self) -> set:
        """``{(channel, instId)}`` subscribed on any open connection."""
        with self._lock:
            return {key for conn in self._conns if conn.is_open for key in conn.subs}

    def book(self, inst_id: str):
        """``(bids, asks)``: the full book as ``[[px, sz], ...]`` lists, best first."""
        with self._lock:
            market = self._market(inst_id)
            return market.levels("bids"), market.levels("asks")

    def seq_id(self, inst_id: str) -> int:
        """The last `books` seqId sent (or to be sent in a snapshot) for ``inst_id``."""
        with self._lock:
            return self._market(inst_id).seq_id

    # -- requests -----------------------------------------------------------------------------

    def _market(self, inst_id: str) -> _Market:
        if inst_id not in self._markets:
            self._markets[inst_id] = _Market(inst_id, self._stamp())
        return self._markets[inst_id]

    def _on_text(self, conn: _Connection, text: str) -> None:
        if text == "ping":
            with self._lock:
                self.received.append(text)
                self.pings_received += 1
            conn.send_frame(OP_TEXT, b"pong")
            return
        try:
            request = json.loads(text)
        except ValueError:
            request = None
        if conn.path == PRIVATE_PATH:
            return self._on_private_request(conn, request, text)
        with self._lock:
            self.received.append(request if isinstance(request, dict) else text)
            self._handle_request(conn, request, text)

    @staticmethod
    def _reply_to(conn: _Connection, request):
        """A function that answers ``request`` on ``conn`` as OKX does: the event echoes the request's ``id``
        and names the connection."""
        id_part = {"id": request["id"]} if isinstance(request, dict) and "id" in request else {}

        def reply(**body):
            message = dict(id_part)
            message.update(body)
            message["connId"] = conn.conn_id
            conn.send_json(message)
        return reply

    def _handle_request(self, conn: _Connection, request, text: str) -> None:
        reply = self._reply_to(conn, request)
        if not isinstance(request, dict) or "op" not in request:
            return reply(event="error", code="60012", msg="Invalid request: " + text)
        op, args = request["op"], request.get("args")
        if op not in ("subscribe", "unsubscribe"):
            return reply(event="error", code="60019", msg="Invalid op: %s" % (op,))
        if not isinstance(args, list) or not args or not all(isinstance(a, dict) for a in args):
            return reply(event="error", code="60012", msg="Invalid request: " + text)
        for arg in args:
            channel, inst_id = arg.get("channel"), arg.get("instId")
            if channel not in CHANNELS or inst_id not in self.instruments:
                reply(event="error", code="60018",
                      msg=NOT_FOUND_MSG.format(channel=channel, inst_id=inst_id))
                continue
            if op == "subscribe":
                conn.subs.add((channel, inst_id))
                reply(event="subscribe", arg=dict(arg))
                self._push_initial(conn, channel, self._market(inst_id))
            else:
                conn.subs.discard((channel, inst_id))
                reply(event="unsubscribe", arg=dict(arg))

    def _push_initial(self, conn: _Connection, channel: str, market: _Market) -> None:
        if channel == "tickers":
            conn.send_json(self._ticker_message(market))
        elif channel == "books5":
            conn.send_json(self._books5_message(market))
        elif channel == "books":
            if self.send_update_without_snapshot_next:
                self.send_update_without_snapshot_next = False
                px, sz = market.levels("bids", 1)[0]
                self._change_book(market.inst_id, [("bids", px, sz)])   # to every subscriber
            else:
                conn.send_json(self._snapshot_message(market))
        # trades: nothing until a trade happens

    # -- message builders ---------------------------------------------------------------------

    @staticmethod
    def _arg(channel: str, market: _Market) -> dict:
        return {"channel": channel, "instId": market.inst_id}

    def _ticker_message(self, market: _Market) -> dict:
        return {"arg": self._arg("tickers", market), "data": [dict(market.ticker)]}

    def _books5_message(self, market: _Market) -> dict:
        bids, asks = market.top5()
        return {"arg": self._arg("books5", market),
                "data": [{"asks": [_book_row(*lv) for lv in asks], "bids": [_book_row(*lv) for lv in bids],
                          "instId": market.inst_id, "ts": self._stamp(), "seqId": market.seq_id}]}

    def _snapshot_message(self, market: _Market) -> dict:
        return {"arg": self._arg("books", market), "action": "snapshot",
                "data": [{"asks": [_book_row(*lv) for lv in market.levels("asks", SNAPSHOT_DEPTH)],
                          "bids": [_book_row(*lv) for lv in market.levels("bids", SNAPSHOT_DEPTH)],
                          "ts": self._stamp(), "checksum": market.checksum() if self.checksums else 0,
                          "prevSeqId": -1, "seqId": market.seq_id}]}

    def _push(self, channel: str, inst_id: str, message: dict) -> None:
        for conn in list(self._conns):
            if conn.is_open and (channel, inst_id) in conn.subs:
                conn.send_json(message)

    def _push_books_update(self, market: _Market, asks: list, bids: list,
                           prev_seq_id: int, checksum: int) -> dict:
        """Push one ``books`` update carrying ``market.seq_id``; returns its ``data[0]``."""
        data = {"asks": asks, "bids": bids, "ts": self._stamp(), "checksum": checksum,
                "prevSeqId": prev_seq_id, "seqId": market.seq_id}
        self._push("books", market.inst_id,
                   {"arg": self._arg("books", market), "action": "update", "data": [data]})
        return data

    def _change_book(self, inst_id: str, changes: list, lose_previous: bool = False,
                     corrupt_checksum: bool = False) -> dict:
        """Apply ``[(side, px, sz)]``, advance seqId, push `books` (and `books5` if the top moved)."""
        with self._lock:
            market = self._market(inst_id)
            top_before = market.top5()
            for side, px, sz in changes:
                market.apply(side, px, sz)
            prev_seq_id = market.seq_id
            if lose_previous:            # a message (prev -> lost) that the client never sees
                prev_seq_id += self._rng.randint(1, 5)
            market.seq_id = prev_seq_id + self._rng.randint(1, 5)
            checksum = market.checksum() if self.checksums else 0
            if corrupt_checksum:
                checksum = (market.checksum() ^ 0x5A5A) or 1
            rows = {"asks": [], "bids": []}
            for side, px, sz in changes:
                rows[side].append(_book_row(px, sz))
            data = self._push_books_update(market, rows["asks"], rows["bids"], prev_seq_id, checksum)
            if market.top5() != top_before:
                self._push("books5", inst_id, self._books5_message(market))
            return data

    # -- mutators for tests -------------------------------------------------------------------

    def set_ticker(self, inst_id: str, **fields) -> dict:
        """Update ticker fields (values stringified; ``ts`` = now unless given); push `tickers`.

        The book is not touched: ``set_level`` and ``add_trade`` do not change the ticker either.
        """
        with self._lock:
            market = self._market(inst_id)
            market.ticker.update({name: str(value) for name, value in fields.items()})
            if "ts" not in fields:
                market.ticker["ts"] = self._stamp()
            self._push("tickers", inst_id, self._ticker_message(market))
            return dict(market.ticker)

    def set_level(self, inst_id: str, side: str, px: str, sz: str) -> dict:
        """Set one level (``side`` "bids"/"asks", ``sz`` "0" deletes); push a `books` update
        with just that level (prevSeqId = last seqId, seqId = last + 1..5) and `books5` if the
        top 5 changed. Returns the update's ``data[0]``."""
        if side not in ("bids", "asks"):
            raise ValueError("side must be 'bids' or 'asks'")
        return self._change_book(inst_id, [(side, str(px), str(sz))])

    def add_trade(self, inst_id: str, px: str, sz: str, side: str = "buy", count="1") -> dict:
        """Record a trade (``side`` = taker side) and push it on `trades`; returns the row. ``count`` is
        OKX's number of matches the pushed row aggregates (its tradeId is the last one's)."""
        with self._lock:
            market = self._market(inst_id)
            market.next_trade_id += 1
            trade = {"instId": inst_id, "tradeId": str(market.next_trade_id), "px": str(px),
                     "sz": str(sz), "side": side, "ts": self._stamp(), "count": str(count), "source": "0",
                     "seqId": market.next_trade_id}
            market.trades.appendleft(trade)
            self._push("trades", inst_id, {"arg": {"channel": "trades", "instId": inst_id},
                                           "data": [dict(trade)]})
            return dict(trade)

    def send_heartbeat(self, inst_id: str) -> dict:
        """A no-change `books` update: empty asks/bids, ``seqId == prevSeqId ==`` last seqId."""
        with self._lock:
            market = self._market(inst_id)
            checksum = market.checksum() if self.checksums else 0
            return self._push_books_update(market, [], [], market.seq_id, checksum)

    def send_reset(self, inst_id: str, new_seq: int) -> dict:
        """A legal post-maintenance reset: ``prevSeqId`` = last seqId, ``seqId = new_seq`` (smaller)."""
        with self._lock:
            market = self._market(inst_id)
            if not 0 <= new_seq < market.seq_id:
                raise ValueError("a reset goes to a smaller seqId (>= 0)")
            prev_seq_id, market.seq_id = market.seq_id, new_seq
            checksum = market.checksum() if self.checksums else 0
            return self._push_books_update(market, [], [], prev_seq_id, checksum)

    def send_gap(self, inst_id: str) -> dict:
        """An update after a lost one: ``prevSeqId`` != last seqId; it bumps the best bid's size."""
        return self._change_book(inst_id, self._bump_best_bid(inst_id), lose_previous=True)

    def send_bad_checksum(self, inst_id: str) -> dict:
        """A correctly chained update (bumps the best bid's size) with a wrong, non-zero checksum."""
        return self._change_book(inst_id, self._bump_best_bid(inst_id), corrupt_checksum=True)

    def _bump_best_bid(self, inst_id: str) -> list:
        with self._lock:
            px, sz = self._market(inst_id).levels("bids", 1)[0]
            return [("bids", px, _fmt(Decimal(sz) + 1))]

    def send_notice_64008(self) -> None:
        """The service-upgrade notice on every open connection (the connections stay open)."""
        with self._lock:
            for conn in list(self._conns):
                if conn.is_open:
                    conn.send_json({"event": "notice", "code": "64008", "msg": NOTICE_64008_MSG,
                                    "connId": conn.conn_id})

    def kill_connections(self) -> None:
        """Drop every client socket abruptly (no close frame)."""
        with self._lock:
            for conn in list(self._conns):
                conn.abort()

    def close_connections(self, code: int = 4004, reason: str = "") -> None:
        """Send a close frame with ``code`` on every connection, then close after the echo
        (or after 1 s without one)."""
        with self._lock:
            for conn in list(self._conns):
                if conn.handshaken:
                    conn.send_close(code, reason)


# ======== Self-tests (python3 -m unittest fake_ws) ========================================


# ---- Tests ----

import fmz_custom_protocol as plugin  # noqa: E402  (after the fakes, which must not depend on it)

SECRET_FIELD = SECRET + "," + PASSPHRASE
DEMO_SECRET_FIELD = DEMO_SECRET + "," + DEMO_PASSPHRASE + ",simulate"
HERE = os.path.dirname(os.path.abspath(__file__))


class LogCapture(logging.Handler):
    """Keeps every formatted plugin log line (at debug level) so tests can read them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(docker_method)s] %(message)s"))
        self.addFilter(plugin._MethodLogFilter())

    def emit(self, record):
        self.lines.append(self.format(record))


LOGS = LogCapture()
plugin.log.handlers[:] = [LOGS]
plugin.log.setLevel(logging.DEBUG)
plugin.log.propagate = False


class Docker:
    """Talks to the plugin as FMZ's docker does: POST /OKX with a JSON body, on a kept-alive connection."""

    def __init__(self, port, exchange="OKX", access_key=KEY, secret_key=SECRET_FIELD, timeout=30):
        self.port, self.exchange, self.timeout = port, exchange, timeout
        self.access_key, self.secret_key = access_key, secret_key
        self.connection = None
        self.nonce = time.time_ns() if hasattr(time, "time_ns") else int(time.time() * 1e9)

    def send(self, body, path=None, headers=None, verb="POST"):
        """Send raw bytes; return (HTTP status, parsed JSON answer)."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        try:
            self.connection.request(verb, path or "/" + self.exchange, body=body, headers=all_headers)
            response = self.connection.getresponse()
            raw = response.read()
        except Exception:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, json.loads(raw.decode("utf-8"))

    def call(self, method, params=None, nonce=None, headers=None, **fields):
        """One docker call; returns the plugin's answer (a dict with "data" or "error")."""
        if nonce is None:
            self.nonce += 1
            nonce = self.nonce
        body = {"access_key": fields.get("access_key", self.access_key),
                "secret_key": fields.get("secret_key", self.secret_key),
                "nonce": nonce, "method": method, "params": {} if params is None else params}
        status, answer = self.send(json.dumps(body).encode("utf-8"), headers=headers)
        assert status == 200, (status, answer)
        return answer

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class PluginTestCase(unittest.TestCase):
    """Starts a fake OKX and the plugin (in this process, on a free loopback port) for every test.

    Both run on one VirtualClock, ``self.clock``: OKX's time, rate windows, the plugin's deadlines, waits
    and clock syncs all follow it. Time stands still unless the test moves it (``self.clock.advance``) or
    the plugin sleeps (a rate-limit wait, an order's expTime: a sleeping thread moves time at once), so
    a test never waits for time to pass. Only real I/O (socket timeouts, latency_ms) takes real time.
    """

    fake_options = {}
    plugin_options = {}

    def setUp(self):
        self.clock = VirtualClock()
        self.fake = FakeOKX(clock=self.clock, **self.fake_options).start()
        self.addCleanup(self.fake.stop)
        self.server = self.start_plugin(**self.plugin_options)
        self.docker = Docker(self.server.server_address[1])
        self.addCleanup(self.docker.close)
        del LOGS.lines[:]

    def start_plugin(self, **options):
        options.setdefault("api_base", self.fake.base_url)
        options.setdefault("clock", self.clock)
        options.setdefault("timeout", 5.0)
        options.setdefault("stream", False)
        server = plugin.PluginServer(("127.0.0.1", 0), plugin.Config(**options))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.002}, daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
            thread.join(5)
        self.addCleanup(stop)
        return server

    def data(self, method, params=None, **fields):
        """The answer's data; fails the test when the plugin answered an error."""
        answer = self.docker.call(method, params, **fields)
        self.assertNotIn("error", answer)
        self.assertIn("data", answer)
        return answer["data"]

    def error(self, method, params=None, **fields):
        """The answer's error text; fails the test when the plugin answered data."""
        answer = self.docker.call(method, params, **fields)
        self.assertIn("error", answer, answer)
        self.assertNotIn("data", answer)
        self.assertIsInstance(answer["error"], str)
        return answer["error"]

    def okx_calls(self, path):
        """Requests the fake received for one path."""
        return [request for request in self.fake.requests if request["path"] == path]

    def order_posts(self):
        return [r for r in self.okx_calls("/api/v5/trade/order") if r["method"] == "POST"]

    def order_lookups(self):
        return [r for r in self.okx_calls("/api/v5/trade/order") if r["method"] == "GET"]

    def relay(self):
        """An OKXRelay in front of the fake (see its section), stopped after the test."""
        relay = OKXRelay(self.fake)
        self.addCleanup(relay.stop)
        return relay

    def place(self, symbol="BTC_USDT", type="buy", price="30000", amount="0.01", **params):
        """Place an order through the plugin; returns the docker order id."""
        params.update(symbol=symbol, type=type, price=price, amount=amount)
        return self.data("trade", params)["id"]


# ---- Pure helpers ----

class HelperTest(unittest.TestCase):
    """The module's pure functions: symbols, decimals, bars, order states, signing."""

    def test_decimal_text_keeps_the_digits_received(self):
        self.assertEqual(plugin.decimal_text("0.00001", "amount"), "0.00001")
        self.assertEqual(plugin.decimal_text("100.50", "price"), "100.50")
        self.assertEqual(plugin.decimal_text(Decimal("1E-5"), "amount"), "0.00001")
        self.assertEqual(plugin.decimal_text("1e-8", "amount"), "0.00000001")
        self.assertEqual(plugin.decimal_text(3, "amount"), "3")
        self.assertEqual(plugin.decimal_text("-1", "price", allow_negative_one=True), "-1")

    def test_decimal_text_refuses_what_is_not_a_positive_number(self):
        for bad in ("abc", "", "0", "-2", "1.2.3", "NaN", "inf", True, None, [1]):
            with self.assertRaises(plugin.BadRequest, msg=repr(bad)):
                plugin.decimal_text(bad, "amount")

    def test_split_symbol(self):
        self.assertEqual(plugin.split_symbol("eth_usdt"), ("ETH", "USDT", ""))
        self.assertEqual(plugin.split_symbol("BTC_USDT.swap"), ("BTC", "USDT", "swap"))
        self.assertEqual(plugin.split_symbol("BTC_USD", "quarter"), ("BTC", "USD", "quarter"))
        self.assertEqual(plugin.split_symbol("BTC_USDT.spot"), ("BTC", "USDT", ""))
        for bad in ("USDT", "", "BTC_", "_USDT", 5, None):
            with self.assertRaises(plugin.BadRequest, msg=repr(bad)):
                plugin.split_symbol(bad)

    def test_fmz_symbol_of_inst_id(self):
        self.assertEqual(plugin.fmz_symbol_of("ETH-USDT"), "ETH_USDT")
        self.assertEqual(plugin.fmz_symbol_of("BTC-USDT-SWAP"), "BTC_USDT.swap")
        self.assertEqual(plugin.fmz_symbol_of("BTC-USD-250328", "quarter"), "BTC_USD.quarter")
        self.assertEqual(plugin.fmz_symbol_of("BTC-USD-250328"), "BTC_USD.250328")

    def test_every_fmz_period_has_its_okx_bar(self):
        expected = {1: "1m", 3: "3m", 5: "5m", 15: "15m", 30: "30m", 60: "1H", 120: "2H", 240: "4H",
                    360: "6Hutc", 720: "12Hutc", 1440: "1Dutc", 10080: "1Wutc"}
        for period, bar in expected.items():
            self.assertEqual(plugin.okx_bar(period), bar)
            self.assertEqual(plugin.okx_bar(str(period)), bar)
        for bad in (2, 0, "60m", 43200):
            with self.assertRaises(plugin.BadRequest):
                plugin.okx_bar(bad)

    def test_order_status(self):
        self.assertEqual(plugin.fmz_order_status("live", "0"), "pending")
        self.assertEqual(plugin.fmz_order_status("partially_filled", "0.1"), "partial-filled")
        self.assertEqual(plugin.fmz_order_status("filled", "1"), "filled")
        self.assertEqual(plugin.fmz_order_status("canceled", "0"), "canceled")
        self.assertEqual(plugin.fmz_order_status("canceled", ""), "canceled")
        self.assertEqual(plugin.fmz_order_status("canceled", "0.2"), "partial-canceled")
        self.assertEqual(plugin.fmz_order_status("mmp_canceled", "0"), "canceled")

    def test_signature_of_a_known_request(self):
        # Computed independently: printf '%s' PREHASH | openssl dgst -sha256 -hmac sk-test -binary | base64
        signature = plugin.sign_request("sk-test", "2020-12-08T09:08:57.715Z", "GET", "/api/v5/account/balance?ccy=BTC")
        self.assertEqual(signature, "P2UGqYhTIowK5GY6ojri0bfVBQYU0Tsy86YQSMfxkWk=")
        self.assertEqual(signature, sign_okx("sk-test", "2020-12-08T09:08:57.715Z", "GET",
                                             "/api/v5/account/balance?ccy=BTC"))

    def test_timestamp_has_three_millisecond_digits_and_z(self):
        self.assertEqual(plugin.okx_timestamp(1607418537715), "2020-12-08T09:08:57.715Z")
        self.assertEqual(plugin.okx_timestamp(1607418537005.9), "2020-12-08T09:08:57.005Z")
        self.assertEqual(plugin.okx_timestamp(1607418537000), "2020-12-08T09:08:57.000Z")

    def test_clord_id_from_nonce_is_stable_and_okx_valid(self):
        clord_id = plugin.clord_id_for(1730275031047002000)
        self.assertEqual(clord_id, "fmz1730275031047002000")
        self.assertEqual(plugin.clord_id_for("1730275031047002000"), clord_id)
        self.assertRegex(plugin.clord_id_for(10 ** 40), r"^[A-Za-z0-9]{1,32}$")
        with self.assertRaises(plugin.BadRequest):
            plugin.clord_id_for(None)

    def test_secret_field(self):
        self.assertEqual(plugin.parse_secret_field("s,p"), ("s", "p", False))
        self.assertEqual(plugin.parse_secret_field("s,p,simulate"), ("s", "p", True))
        self.assertEqual(plugin.parse_secret_field("s, p ,SIMULATE"), ("s", "p", True))
        for bad in ("s", "s,", ",p", None):
            with self.assertRaises(plugin.BadRequest):
                plugin.parse_secret_field(bad)


# ---- The docker's envelope ----

class EnvelopeTest(PluginTestCase):
    """How the plugin speaks HTTP with the docker: paths, verbs, method spellings, keep-alive."""

    def test_answer_has_data_and_raw(self):
        answer = self.docker.call("ticker", {"symbol": "BTC_USDT"})
        self.assertEqual(answer["data"]["symbol"], "BTC_USDT")
        self.assertEqual(answer["raw"]["instId"], "BTC-USDT")

    def test_method_names_are_case_insensitive_and_accept_get_spelling(self):
        for method in ("ticker", "TICKER", "GetTicker", "getticker"):
            self.assertEqual(self.data(method, {"symbol": "ETH_USDT"})["symbol"], "ETH_USDT")
        self.assertIn("BTC_USDT", self.data("GetMarkets"))
        self.assertEqual(self.data("getAccount")[0].keys(), {"currency", "free", "frozen"})

    def test_unknown_method_is_an_error_naming_it(self):
        self.assertIn("'fly'", self.error("fly"))
        self.assertEqual(self.fake.requests, [])

    def test_get_spelling_never_reaches_a_method_that_acts(self):
        for method in ("GetTrade", "GetCancel", "GetSetMarginLevel"):
            self.assertIn("unknown method", self.error(method, {"symbol": "BTC_USDT", "type": "buy", "price": "1",
                                                                "amount": "1", "id": "BTC-USDT,1"}))
        self.assertEqual(self.fake.requests, [])

    def test_unknown_exchange_is_an_error(self):
        status, answer = self.docker.send(json.dumps({"method": "ticker", "params": {"symbol": "BTC_USDT"}}).encode(),
                                          path="/Binance")
        self.assertEqual(status, 200)
        self.assertIn("unknown exchange", answer["error"])
        self.assertEqual(self.okx_calls("/api/v5/market/ticker"), [])

    def test_exchange_path_is_case_insensitive(self):
        status, answer = self.docker.send(json.dumps({"method": "ticker", "params": {"symbol": "BTC_USDT"}}).encode(),
                                          path="/okx")
        self.assertEqual(answer["data"]["symbol"], "BTC_USDT")

    def test_verbs_other_than_post_get_an_error(self):
        for verb in ("GET", "PUT", "DELETE"):
            status, answer = self.docker.send(b"", verb=verb)
            self.assertEqual(status, 200)
            self.assertIn("only POST", answer["error"])
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["symbol"], "BTC_USDT")

    def test_one_connection_serves_many_calls(self):
        for _ in range(20):
            self.data("ticker", {"symbol": "BTC_USDT"})
        self.assertIsNotNone(self.docker.connection)
        self.assertEqual(self.fake.connections, 1)     # and towards OKX one kept-alive connection

    def test_server_header_names_the_plugin_without_a_trailing_space(self):
        for data in (request_bytes(docker_body("ticker", {"symbol": "BTC_USDT"})), b"GARBAGE\r\n\r\n"):
            docker = RawDocker(self.server.server_address[1])
            self.addCleanup(docker.close)
            docker.send(data)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = docker.sock.recv(65536)
                self.assertTrue(chunk, head)
                head += chunk
            server = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
            self.assertEqual(server, [b"Server: fmz-okx-plugin/" + plugin.__version__.encode()], data[:8])

    def test_robots_are_served_concurrently(self):
        self.data("accounts")                       # OKX's clock read: one round trip for each call below
        self.fake.latency_ms = 400
        answers = []

        def robot(method, params):
            docker = Docker(self.server.server_address[1])
            answers.append(docker.call(method, params))
            docker.close()
        robots = [threading.Thread(target=robot, args=("ticker", {"symbol": "ETH_USDT"})),
                  threading.Thread(target=robot, args=("depth", {"symbol": "BTC_USDT", "limit": 5})),
                  threading.Thread(target=robot, args=("accounts", {}))]
        started = time.monotonic()
        for thread in robots:
            thread.start()
        for thread in robots:
            thread.join()
        self.assertLess(time.monotonic() - started, 1.0)    # one after another would take 1.2 s
        self.assertEqual(len([answer for answer in answers if "data" in answer]), 3)


# ---- Market data ----

class MarketDataTest(PluginTestCase):
    """ticker, depth, trades, records, tickers, markets: public OKX data in the docker's shapes."""

    def okx(self, path):
        status, answer = okx_request(self.fake.base_url, "GET", path, signed=False)
        self.assertEqual(answer["code"], "0")
        return answer["data"]

    def test_ticker_maps_okx_fields(self):
        self.fake.set_price("ETH-USDT", "2922.18", "2922.19", last="2922.185")
        ticker = self.data("ticker", {"symbol": "eth_usdt"})
        row = self.okx("/api/v5/market/ticker?instId=ETH-USDT")[0]
        self.assertAlmostEqual(ticker.pop("time"), int(row["ts"]), delta=2000)
        self.assertEqual(ticker, {"symbol": "ETH_USDT", "buy": "2922.18", "sell": "2922.19", "high": row["high24h"],
                                  "low": row["low24h"], "open": row["open24h"], "last": "2922.185",
                                  "vol": row["vol24h"]})

    def test_symbol_without_quote_is_an_error_without_calling_okx(self):
        self.assertIn("'USDT'", self.error("ticker", {"symbol": "USDT"}))
        self.assertIn("symbol", self.error("ticker", {}))
        self.assertEqual(self.okx_calls("/api/v5/market/ticker"), [])

    def test_unknown_instrument_answers_okx_code(self):
        self.assertIn("OKX 51001", self.error("ticker", {"symbol": "NOPE_USDT"}))

    def test_depth_honours_limit_and_orders_levels(self):
        depth = self.data("depth", {"symbol": "BTC_USDT", "limit": "30"})
        self.assertEqual((len(depth["asks"]), len(depth["bids"])), (30, 30))
        asks = [Decimal(price) for price, _ in depth["asks"]]
        bids = [Decimal(price) for price, _ in depth["bids"]]
        self.assertEqual(asks, sorted(asks))
        self.assertEqual(bids, sorted(bids, reverse=True))
        self.assertLess(bids[0], asks[0])
        self.assertIsInstance(depth["time"], int)
        self.assertEqual(self.okx_calls("/api/v5/market/books")[-1]["query"], "instId=BTC-USDT&sz=30")
        book = self.okx("/api/v5/market/books?instId=BTC-USDT&sz=30")[0]
        self.assertEqual(depth["asks"][0], book["asks"][0][:2])

    def test_depth_beyond_okx_maximum_is_capped_at_400(self):
        depth = self.data("depth", {"symbol": "BTC_USDT", "limit": 1000})
        self.assertEqual(len(depth["asks"]), 400)
        self.assertIn("limit", self.error("depth", {"symbol": "BTC_USDT", "limit": "lots"}))

    def test_trades_newest_first_with_taker_side(self):
        trades = self.data("trades", {"symbol": "BTC_USDT"})
        rows = self.okx("/api/v5/market/trades?instId=BTC-USDT&limit=100")
        self.assertEqual(len(trades), 100)
        self.assertEqual(trades[0], {"id": rows[0]["tradeId"], "time": int(rows[0]["ts"]), "price": rows[0]["px"],
                                     "amount": rows[0]["sz"], "type": rows[0]["side"]})
        self.assertTrue(all(t["type"] in ("buy", "sell") for t in trades))
        self.assertGreaterEqual(trades[0]["time"], trades[-1]["time"])

    def test_records_every_period_uses_its_bar(self):
        for period, bar in plugin.PERIOD_TO_BAR.items():
            bars = self.data("records", {"symbol": "BTC_USDT", "period": str(period), "limit": "5"})
            self.assertEqual(len(bars), 5)
            self.assertIn("bar=%s&" % bar, self.okx_calls("/api/v5/market/candles")[-1]["query"] + "&")
        self.assertIn("period", self.error("records", {"symbol": "BTC_USDT", "period": "7"}))

    def test_records_beyond_300_page_back_oldest_first(self):
        bars = self.data("records", {"symbol": "BTC_USDT", "period": 60, "limit": 1000})
        self.assertEqual(len(bars), 1000)
        times = [bar[0] for bar in bars]
        self.assertEqual(times, list(range(times[0], times[0] + 3600 * 1000, 3600)))   # ascending, no gap
        newest = self.okx("/api/v5/market/candles?instId=BTC-USDT&bar=1H&limit=1")[0]
        self.assertEqual(bars[-1], [int(newest[0]) // 1000] + newest[1:6])               # unfinished bar last
        self.assertGreaterEqual(len(self.okx_calls("/api/v5/market/history-candles")), 7)

    def test_tickers_lists_every_spot_instrument(self):
        tickers = self.data("tickers")
        symbols = {ticker["symbol"] for ticker in tickers}
        self.assertTrue({"BTC_USDT", "ETH_USDT", "ETH_BTC"} <= symbols)
        self.assertTrue(all("." not in symbol for symbol in symbols))
        self.assertEqual(self.okx_calls("/api/v5/market/tickers")[-1]["query"], "instType=SPOT")

    def test_markets_keyed_by_fmz_symbol_and_cached(self):
        markets = self.data("markets")
        btc = markets["BTC_USDT"]
        self.assertEqual((btc["symbol"], btc["baseAsset"], btc["quoteAsset"]), ("BTC_USDT", "BTC", "USDT"))
        self.assertEqual((btc["tickSize"], btc["pricePrecision"]), ("0.1", 1))
        self.assertEqual((btc["amountSize"], btc["amountPrecision"], btc["minQty"]), ("0.00000001", 8, "0.00001"))
        self.assertEqual(set(btc), {"symbol", "baseAsset", "quoteAsset", "tickSize", "amountSize", "pricePrecision",
                                    "amountPrecision", "minQty", "maxQty", "minNotional", "maxNotional", "ctVal",
                                    "ctValCcy"})
        self.data("markets")
        self.assertEqual(len(self.okx_calls("/api/v5/public/instruments")), 1)


# ---- Account ----

class AccountTest(PluginTestCase):
    """accounts and assets: the trading account's balances; keys, passphrases and demo trading."""

    def test_accounts_free_and_frozen(self):
        self.fake.set_balance("USDT", "1234.5", frozen="65.5")
        balances = {row["currency"]: row for row in self.data("accounts")}
        self.assertEqual(balances["USDT"], {"currency": "USDT", "free": "1234.5", "frozen": "65.5"})
        self.assertEqual(balances["BTC"]["free"], "0.5")

    def test_assets_has_the_same_shape(self):
        self.assertEqual(self.data("assets"), self.data("accounts"))

    def test_frozen_follows_a_resting_order(self):
        self.place(price="30000", amount="0.01")
        usdt = [row for row in self.data("accounts") if row["currency"] == "USDT"][0]
        self.assertEqual((Decimal(usdt["free"]), Decimal(usdt["frozen"])), (Decimal("9700"), Decimal("300")))

    def test_secret_without_passphrase_is_refused_before_okx(self):
        error = self.error("accounts", secret_key=SECRET)
        self.assertIn("SECRET,PASSPHRASE", error)
        self.assertNotIn(SECRET, error.replace("SECRET,PASSPHRASE", ""))
        self.assertEqual(self.okx_calls("/api/v5/account/balance"), [])

    def test_wrong_secret_answers_okx_code_with_hint(self):
        error = self.error("accounts", secret_key="wrong," + PASSPHRASE)
        self.assertIn("OKX 50113", error)
        self.assertIn("hint", error)

    def test_demo_key_with_simulate_uses_the_demo_header(self):
        balances = {row["currency"]: row for row in self.data("accounts", access_key=DEMO_KEY,
                                                              secret_key=DEMO_SECRET_FIELD)}
        self.assertEqual(balances["USDT"]["free"], "100000")
        request = self.okx_calls("/api/v5/account/balance")[-1]
        self.assertEqual(request["headers"].get("x-simulated-trading"), "1")

    def test_demo_key_without_simulate_explains_50101(self):
        error = self.error("accounts", access_key=DEMO_KEY, secret_key=DEMO_SECRET + "," + DEMO_PASSPHRASE)
        self.assertIn("OKX 50101", error)
        self.assertIn(",simulate", error)


# ---- Orders ----

class OrderTest(PluginTestCase):
    """trade, orders, order, historyorders, cancel on spot."""

    def order_body(self):
        return json.loads(self.okx_calls("/api/v5/trade/order")[-1]["body"])

    def test_limit_order_reaches_okx_with_exact_decimals(self):
        order_id = self.place(symbol="BTC_USDT", type="buy", price="30000.1", amount="0.00001")
        body = self.order_body()
        self.assertEqual((body["px"], body["sz"], body["ordType"], body["tdMode"], body["side"]),
                         ("30000.1", "0.00001", "limit", "cash", "buy"))
        inst_id, ord_id = order_id.split(",")
        self.assertEqual(inst_id, "BTC-USDT")
        self.assertEqual([o["ordId"] for o in self.fake.orders()], [ord_id])

    def test_json_numbers_never_pass_through_float(self):
        body = ('{"access_key":"%s","secret_key":"%s","nonce":17,"method":"trade","params":'
                '{"symbol":"BTC_USDT","type":"buy","price":30000.10,"amount":1e-05}}' % (KEY, SECRET_FIELD))
        status, answer = self.docker.send(body.encode())
        self.assertIn("data", answer, answer)
        self.assertEqual((self.order_body()["px"], self.order_body()["sz"]), ("30000.10", "0.00001"))

    def test_every_order_carries_a_clordid_from_the_nonce(self):
        self.data("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"},
                  nonce=1730275031047002000)
        self.assertEqual(self.order_body()["clOrdId"], "fmz1730275031047002000")
        self.assertEqual(self.fake.orders()[0]["clOrdId"], "fmz1730275031047002000")

    def test_repeated_request_with_the_same_nonce_places_one_order(self):
        params = {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"}
        first = self.data("trade", params, nonce=42)
        second = self.data("trade", params, nonce=42)
        self.assertEqual(first, second)
        self.assertEqual(len(self.fake.orders()), 1)

    def test_market_buy_amount_is_quote(self):
        self.place(symbol="ETH_USDT", type="buy", price="-1", amount="100")
        body = self.order_body()
        self.assertEqual((body["ordType"], body["tgtCcy"], body["sz"]), ("market", "quote_ccy", "100"))
        self.assertNotIn("px", body)
        self.assertEqual(self.fake.orders()[0]["state"], "filled")

    def test_market_sell_amount_is_base(self):
        self.place(symbol="ETH_USDT", type="sell", price="-1", amount="0.5")
        body = self.order_body()
        self.assertEqual((body["ordType"], body["tgtCcy"], body["sz"], body["side"]), ("market", "base_ccy", "0.5", "sell"))

    def test_trade_parameters_are_checked(self):
        base = {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"}
        for name, value in (("amount", "abc"), ("amount", "-1"), ("amount", "0"), ("price", "0"),
                            ("type", "hold"), ("type", "closebuy")):
            self.assertIn(name, self.error("trade", dict(base, **{name: value})))
        self.assertIn("amount", self.error("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "1"}))
        self.assertEqual(self.okx_calls("/api/v5/trade/order"), [])

    def test_rejected_order_names_okx_scode(self):
        error = self.error("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "40000", "amount": "10"})
        self.assertIn("OKX 51008", error)
        self.assertIn("Insufficient USDT", error)
        self.assertEqual(self.fake.orders(), [])

    def test_orders_lists_open_orders(self):
        order_id = self.place(price="30000", amount="0.01")
        self.place(symbol="ETH_USDT", type="sell", price="3500", amount="0.1")
        orders = self.data("orders", {"symbol": "BTC_USDT"})
        self.assertEqual(orders, [{"id": order_id, "symbol": "BTC_USDT", "amount": "0.01", "price": "30000",
                                   "deal_amount": "0", "avg_price": "0", "type": "buy", "status": "pending"}])
        self.assertEqual(len(self.data("orders")), 2)

    def test_orders_reads_every_page(self):
        self.fake.set_balance("USDT", "1000000")
        placed = set(self.place(price=str(20000 + n), amount="0.001") for n in range(230))
        orders = self.data("orders", {"symbol": "BTC_USDT"})
        self.assertEqual(len(orders), 230)
        self.assertEqual(set(order["id"] for order in orders), placed)
        self.assertEqual(len(self.okx_calls("/api/v5/trade/orders-pending")), 3)

    def test_order_follows_fills_and_cancel(self):
        order_id = self.place(price="30000", amount="0.02")
        ord_id = order_id.split(",")[1]
        self.assertEqual(self.data("order", {"id": order_id, "symbol": "BTC_USDT"})["status"], "pending")
        self.fake.fill(ord_id, sz="0.005")
        order = self.data("order", {"id": order_id, "symbol": "BTC_USDT"})
        self.assertEqual((order["status"], order["deal_amount"], order["avg_price"]),
                         ("partial-filled", "0.005", "30000"))
        self.assertIs(self.data("cancel", {"id": order_id, "symbol": "BTC_USDT"}), True)
        self.assertEqual(self.data("order", {"id": order_id})["status"], "partial-canceled")

    def test_cancel_and_cancel_again(self):
        order_id = self.place(price="30000", amount="0.01")
        self.assertIs(self.data("cancel", {"id": order_id, "symbol": "BTC_USDT"}), True)
        self.assertEqual(self.fake.orders()[0]["state"], "canceled")
        self.assertEqual(self.data("order", {"id": order_id})["status"], "canceled")
        self.assertIn("OKX 51400", self.error("cancel", {"id": order_id, "symbol": "BTC_USDT"}))

    def test_bare_order_id_uses_the_symbol(self):
        order_id = self.place(price="30000", amount="0.01")
        bare = order_id.split(",")[1]
        self.assertEqual(self.data("order", {"id": bare, "symbol": "BTC_USDT"})["id"], order_id)
        self.assertIn("INSTID,ORDID", self.error("order", {"id": bare}))

    def test_unknown_order_is_a_clear_error(self):
        error = self.error("order", {"id": "BTC-USDT,1234567890123456789", "symbol": "BTC_USDT"})
        self.assertIn("no such order", error)
        self.assertIn("51603", error)

    def test_historyorders_reaches_the_archive_newest_first(self):
        recent = self.fake.add_history_order("BTC-USDT", age_days=1)
        older = self.fake.add_history_order("BTC-USDT", age_days=3, state="canceled", acc_fill_sz="0.004")
        archived = self.fake.add_history_order("BTC-USDT", age_days=20, side="sell")
        self.fake.add_history_order("ETH-USDT", age_days=1)
        orders = self.data("historyorders", {"symbol": "BTC_USDT", "since": 0, "limit": 0})
        self.assertEqual([order["id"] for order in orders],
                         ["BTC-USDT," + recent, "BTC-USDT," + older, "BTC-USDT," + archived])
        self.assertEqual([order["status"] for order in orders], ["filled", "partial-canceled", "filled"])
        self.assertEqual(orders[2]["type"], "sell")

    def test_historyorders_since_and_limit(self):
        for age in (1, 2, 3, 4):
            self.fake.add_history_order("BTC-USDT", age_days=age)
        since = self.fake.now_ms() - int(2.5 * 86400000)
        self.assertEqual(len(self.data("historyorders", {"symbol": "BTC_USDT", "since": since, "limit": 0})), 2)
        self.assertEqual(len(self.data("historyorders", {"symbol": "BTC_USDT", "since": 0, "limit": 3})), 3)
        self.assertEqual(self.okx_calls("/api/v5/trade/orders-history-archive"), [])


# ---- exchange.IO passthrough ----

class PassthroughTest(PluginTestCase):
    """``__api_<path>``: any OKX endpoint, signed, with the verb from the Http-Method header."""

    def test_get_sends_params_as_signed_query(self):
        self.place(price="30000", amount="0.01")
        answer = self.data("__api_/api/v5/trade/orders-pending", {"instType": "SPOT", "instId": "BTC-USDT"},
                           headers={"Http-Method": "GET"})
        self.assertEqual(answer["code"], "0")
        self.assertEqual(len(answer["data"]), 1)
        request = self.okx_calls("/api/v5/trade/orders-pending")[-1]
        self.assertEqual(urllib.parse.parse_qs(request["query"]), {"instType": ["SPOT"], "instId": ["BTC-USDT"]})
        self.assertIn("OK-ACCESS-SIGN", request["headers"])

    def test_post_sends_params_as_json_body(self):
        answer = self.data("__api_/api/v5/trade/order", {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy",
                                                         "ordType": "limit", "px": "30000", "sz": "0.01"},
                           headers={"Http-Method": "POST"})
        self.assertEqual(answer["data"][0]["sCode"], "0")
        self.assertEqual(len(self.fake.orders()), 1)

    def test_delete_uses_the_delete_verb(self):
        self.error("__api_/api/v5/trade/order", {"instId": "BTC-USDT"}, headers={"Http-Method": "DELETE"})
        self.assertEqual(self.okx_calls("/api/v5/trade/order")[-1]["method"], "DELETE")

    def test_okx_error_is_reported_with_its_code(self):
        self.assertIn("OKX 51001", self.error("__api_/api/v5/market/ticker", {"instId": "NOPE-USDT"}))

    def test_path_must_be_an_api_path(self):
        self.assertIn("/api/", self.error("__api_/../etc/passwd", {}))


class FakeSelfTest(unittest.TestCase):
    """The fake checked on its own, with a signing helper independent of the plugin."""

    def setUp(self):
        self.fake = FakeOKX().start()
        self.addCleanup(self.fake.stop)

    def test_signed_balance_call_succeeds(self):
        status, answer = okx_request(self.fake.base_url, "GET", "/api/v5/account/balance")
        self.assertEqual((status, answer["code"]), (200, "0"))
        usdt = [row for row in answer["data"][0]["details"] if row["ccy"] == "USDT"][0]
        self.assertEqual((usdt["availBal"], usdt["frozenBal"]), ("10000", "0"))

    def test_wrong_signature_is_50113_with_http_401(self):
        status, answer = okx_request(self.fake.base_url, "GET", "/api/v5/account/balance", secret="not-the-secret")
        self.assertEqual((status, answer["code"], answer["msg"]), (401, "50113", "Invalid Sign"))

    def test_timestamp_outside_30_seconds_is_50102(self):
        self.fake.clock_skew_ms = 45000
        status, answer = okx_request(self.fake.base_url, "GET", "/api/v5/account/config")
        self.assertEqual((status, answer["code"]), (401, "50102"))
        status, answer = okx_request(self.fake.base_url, "GET", "/api/v5/account/config",
                                     timestamp=okx_timestamp(self.fake.now_ms()))
        self.assertEqual((status, answer["code"]), (200, "0"))

    def test_limit_order_rests_is_listed_and_cancels(self):
        order = {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000",
                 "sz": "0.01", "clOrdId": "selftest1"}
        status, placed = okx_request(self.fake.base_url, "POST", "/api/v5/trade/order", order)
        self.assertEqual((status, placed["code"], placed["data"][0]["sCode"]), (200, "0", "0"))
        ord_id = placed["data"][0]["ordId"]
        self.assertEqual(len(ord_id), 19)
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9700"), Decimal("300")))
        _, pending = okx_request(self.fake.base_url, "GET", "/api/v5/trade/orders-pending?instId=BTC-USDT")
        self.assertEqual([(o["ordId"], o["state"], o["px"]) for o in pending["data"]], [(ord_id, "live", "30000")])
        _, again = okx_request(self.fake.base_url, "POST", "/api/v5/trade/order", order)
        self.assertEqual((again["code"], again["data"][0]["sCode"]), ("1", "51016"))
        _, canceled = okx_request(self.fake.base_url, "POST", "/api/v5/trade/cancel-order",
                                  {"instId": "BTC-USDT", "ordId": ord_id})
        self.assertEqual(canceled["data"][0]["sCode"], "0")
        _, detail = okx_request(self.fake.base_url, "GET", "/api/v5/trade/order?instId=BTC-USDT&clOrdId=selftest1")
        self.assertEqual(detail["data"][0]["state"], "canceled")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("10000"), Decimal("0")))

    def test_proxy_tunnels_to_tls_fake_with_credentials(self):
        fake = FakeOKX(tls=True).start()
        self.addCleanup(fake.stop)
        with FakeProxy(user="robot", password="s3cret") as proxy:
            with self.assertRaises(OSError):        # http.client: "Tunnel connection failed: 407 ..."
                okx_request(fake.base_url, "GET", "/api/v5/public/time", proxy=proxy.url, cafile=fake.cert_path,
                            signed=False)
            with_credentials = proxy.url.replace("http://", "http://robot:s3cret@")
            status, answer = okx_request(fake.base_url, "GET", "/api/v5/public/time", proxy=with_credentials,
                                         cafile=fake.cert_path, signed=False)
        self.assertEqual((status, answer["code"]), (200, "0"))
        self.assertEqual((proxy.tunnels, fake.connections), (1, 1))
        self.assertEqual(proxy.auth_seen, ["Basic " + base64.b64encode(b"robot:s3cret").decode()])

    def test_candle_paging_has_no_gaps_or_duplicates(self):
        seen, after = [], ""
        while len(seen) < 700:
            path = "/api/v5/market/%s?instId=BTC-USDT&bar=1H&limit=%d%s" % (
                "candles" if len(seen) < 300 else "history-candles", 300 if len(seen) < 300 else 100, after)
            status, answer = okx_request(self.fake.base_url, "GET", path, signed=False)
            self.assertEqual((status, answer["code"]), (200, "0"))
            seen += [int(row[0]) for row in answer["data"]]
            after = "&after=%d" % seen[-1]
        self.assertEqual(seen, list(range(seen[0], seen[0] - 3600000 * len(seen), -3600000)))
        self.assertEqual(answer["data"][0][8], "1")


class FakeTradeTestCase(unittest.TestCase):
    """Helpers of the fake's own tests of algo orders, amendments, batches and options (signed REST)."""

    def setUp(self):
        self.fake = FakeOKX().start()
        self.addCleanup(self.fake.stop)

    def rest(self, method, path, body=None, status=200):
        got, answer = okx_request(self.fake.base_url, method, path, body)
        self.assertEqual(got, status, answer)
        return answer

    def error(self, method, path, body=None, status=200):
        """The (code, msg) of an answer that is an error, top-level or in data[0].sCode."""
        answer = self.rest(method, path, body, status)
        if answer.get("data") and "sCode" in answer["data"][0]:
            self.assertEqual(answer["code"], "1", answer)
            return answer["data"][0]["sCode"], answer["data"][0]["sMsg"]
        self.assertNotEqual(answer["code"], "0", answer)
        return answer["code"], answer["msg"]

    def place_algo(self, **body):
        answer = self.rest("POST", "/api/v5/trade/order-algo", body)
        self.assertEqual((answer["code"], answer["data"][0]["sCode"]), ("0", "0"), answer)
        return answer["data"][0]["algoId"]

    def algo_error(self, **body):
        return self.error("POST", "/api/v5/trade/order-algo", body)[0]

    def algo_row(self, algo_id):
        return self.rest("GET", "/api/v5/trade/order-algo?algoId=" + algo_id)["data"][0]

    def place(self, **body):
        answer = self.rest("POST", "/api/v5/trade/order", body)
        self.assertEqual(answer["data"][0]["sCode"], "0", answer)
        return answer["data"][0]["ordId"]

    def order_row(self, inst_id, ord_id):
        return self.rest("GET", "/api/v5/trade/order?instId=%s&ordId=%s" % (inst_id, ord_id))["data"][0]

    def ids(self, path):
        return [row["algoId"] for row in self.rest("GET", path)["data"]]

    def option_id(self, strike="43000", kind="C"):
        """A BTC-USD option the fake lists, of its latest expiry (weeks ahead whatever the day)."""
        rows = self.rest("GET", "/api/v5/public/instruments?instType=OPTION&instFamily=BTC-USD")["data"]
        rows = [row for row in rows if (row["stk"], row["optType"]) == (strike, kind)]
        return max(rows, key=lambda row: int(row["expTime"]))["instId"]


SPOT_SELL_OCO = {"instId": "BTC-USDT", "tdMode": "cash", "side": "sell", "ordType": "oco", "sz": "0.01",
                 "tpTriggerPx": "44000", "tpOrdPx": "-1", "slTriggerPx": "42000", "slOrdPx": "-1"}


class FakeAlgoSelfTest(FakeTradeTestCase):
    """Algo orders of the fake: placing, firing, amending, cancelling, listing (OKX's v5 docs)."""

    def test_each_ord_type_is_placed_and_listed_pending(self):
        cond = self.place_algo(instId="BTC-USDT", tdMode="cash", side="sell", ordType="conditional", sz="0.001",
                               tpTriggerPx="45000", tpOrdPx="-1", algoClOrdId="cond1")
        oco = self.place_algo(instId="BTC-USDT-SWAP", tdMode="cross", side="sell", ordType="oco", sz="1",
                              reduceOnly=True, tpTriggerPx="45000", tpOrdPx="-1", slTriggerPx="41000", slOrdPx="-1")
        trigger = self.place_algo(instId="BTC-USDT", tdMode="cash", side="buy", ordType="trigger", sz="0.001",
                                  triggerPx="42000", orderPx="41990")
        self.assertEqual([len(cond), len(oco), len(trigger)], [19, 19, 19])
        pending = self.rest("GET", "/api/v5/trade/orders-algo-pending?ordType=conditional,oco")["data"]
        self.assertEqual([row["algoId"] for row in pending], [oco, cond])      # newest first
        oco_row, cond_row = pending
        expected = {"instType": "SPOT", "state": "live", "actualSz": "0", "actualSide": "", "tpTriggerPx": "45000",
                    "tpOrdPx": "-1", "tpTriggerPxType": "last", "slTriggerPx": "", "tgtCcy": "base_ccy",
                    "posSide": "net", "reduceOnly": "false", "ordPx": "", "triggerTime": "", "failCode": "",
                    "ordIdList": [], "algoClOrdId": "cond1", "last": "43000.1"}
        self.assertEqual({name: cond_row[name] for name in expected}, expected)
        self.assertEqual((oco_row["instType"], oco_row["reduceOnly"], oco_row["lever"], oco_row["slTriggerPx"]),
                         ("SWAP", "true", "10", "41000"))
        rows = self.rest("GET", "/api/v5/trade/orders-algo-pending?ordType=trigger")["data"]
        self.assertEqual([(r["algoId"], r["triggerPx"], r["ordPx"], r["triggerPxType"], r["tgtCcy"]) for r in rows],
                         [(trigger, "42000", "41990", "last", "")])
        path = "/api/v5/trade/orders-algo-pending?ordType=conditional,oco"
        self.assertEqual(self.ids(path + "&instId=BTC-USDT"), [cond])
        self.assertEqual(self.ids(path + "&instType=SWAP"), [oco])
        self.assertEqual(self.ids(path + "&algoId=" + oco), [oco])
        self.assertEqual(self.error("GET", "/api/v5/trade/orders-algo-pending", status=400)[0], "50014")
        self.assertEqual(self.error("GET", "/api/v5/trade/orders-algo-pending?ordType=trigger,oco", status=400)[0],
                         "51000")
        self.assertEqual(self.algo_row(cond)["algoClOrdId"], "cond1")
        by_client_id = self.rest("GET", "/api/v5/trade/order-algo?algoClOrdId=cond1")["data"]
        self.assertEqual([row["algoId"] for row in by_client_id], [cond])
        self.assertEqual([a["algoId"] for a in self.fake.algo_orders()], [trigger, oco, cond])
        self.assertEqual(self.fake.balance("USDT"), (Decimal("10000"), Decimal("0")))     # algo orders freeze nothing

    def test_an_algo_client_id_is_taken_for_good_51065(self):
        body = dict(SPOT_SELL_OCO, algoClOrdId="dup1")
        algo_id = self.place_algo(**body)
        self.assertEqual(self.error("POST", "/api/v5/trade/order-algo", body),
                         ("51065", "algoClOrdId already exists."))
        self.rest("POST", "/api/v5/trade/cancel-algos", [{"instId": "BTC-USDT", "algoId": algo_id}])
        self.assertEqual(self.algo_error(**body), "51065")
        self.assertEqual(self.algo_error(**dict(body, algoClOrdId="not-alnum")), "51000")

    def test_trigger_orders_on_contracts_need_long_short_mode_51298(self):
        body = {"instId": "BTC-USDT-SWAP", "tdMode": "cross", "side": "buy", "ordType": "trigger", "sz": "1",
                "triggerPx": "44000", "orderPx": "-1"}
        self.assertEqual(self.error("POST", "/api/v5/trade/order-algo", body),
                         ("51298", "Trigger orders are not available in the net mode of Expiry Futures and "
                                   "Perpetual Futures"))
        self.fake.set_position_mode("long_short_mode")
        self.assertEqual(self.algo_error(**body), "50014")                       # posSide is required there
        self.assertEqual(self.algo_error(**dict(body, posSide="net")), "51000")
        self.assertEqual(self.algo_row(self.place_algo(**dict(body, posSide="long")))["posSide"], "long")
        option = dict(body, instId=self.option_id(), posSide="")
        self.assertEqual(self.algo_error(**option), "51000")                     # trigger: SPOT/FUTURES/SWAP only

    def test_tp_and_sl_on_the_wrong_side_of_the_last_price_are_51277_to_51280(self):
        base = {"instId": "BTC-USDT", "tdMode": "cash", "sz": "0.01", "ordType": "conditional"}   # last 43000.1
        cases = [("buy", "tp", "44000", "51277"), ("buy", "sl", "42000", "51278"),
                 ("sell", "tp", "42000", "51279"), ("sell", "sl", "44000", "51280")]
        for side, leg, price, code in cases:
            body = dict(base, side=side, **{leg + "TriggerPx": price, leg + "OrdPx": "-1"})
            self.assertEqual(self.algo_error(**body), code, (side, leg))
        self.place_algo(**dict(base, side="sell", tpTriggerPx="43000.1", tpOrdPx="-1"))      # at the last price
        self.assertEqual(self.algo_error(**dict(SPOT_SELL_OCO, slTriggerPx="43500")), "51280")
        # a conditional order with both legs only performs (and checks) its stop-loss
        self.place_algo(**dict(base, side="sell", tpTriggerPx="42000", tpOrdPx="-1", slTriggerPx="42000",
                               slOrdPx="-1"))

    def test_a_leg_must_be_whole_and_never_priced_0(self):
        conditional = {"instId": "BTC-USDT", "tdMode": "cash", "side": "sell", "ordType": "conditional", "sz": "0.01"}
        self.assertEqual(self.error("POST", "/api/v5/trade/order-algo",
                                    dict(conditional, tpTriggerPx="0", tpOrdPx="-1")),
                         ("51000", "Parameter tpTriggerPx error"))
        self.assertEqual(self.algo_error(**dict(conditional, tpTriggerPx="45000", tpOrdPx="0")), "51000")
        self.assertEqual(self.error("POST", "/api/v5/trade/order-algo", dict(conditional, tpTriggerPx="45000")),
                         ("50014", "Parameter tpOrdPx can not be empty."))
        self.assertEqual(self.algo_error(**conditional), "50015")
        self.assertEqual(self.algo_error(**dict(SPOT_SELL_OCO, slTriggerPx="", slOrdPx="")), "50014")
        self.assertEqual(self.algo_error(**dict(conditional, tpTriggerPx="45000.05", tpOrdPx="-1")), "51000")
        trigger = dict(conditional, ordType="trigger", side="buy", triggerPx="42000")
        self.assertEqual(self.algo_error(**trigger), "50014")
        self.assertEqual(self.algo_error(**dict(trigger, orderPx="-1", tgtCcy="base_ccy")), "51281")
        buy = dict(conditional, side="buy", slTriggerPx="44000", slOrdPx="44100")
        self.assertEqual(self.algo_error(**dict(buy, tgtCcy="quote_ccy")), "51000")     # quote size, limit leg
        self.assertEqual(self.algo_row(self.place_algo(**buy))["tgtCcy"], "base_ccy")
        self.assertEqual(self.algo_row(self.place_algo(**dict(buy, slOrdPx="-1", sz="100")))["tgtCcy"], "quote_ccy")
        self.assertEqual(self.algo_error(**dict(conditional, tpTriggerPx="45000", tpOrdPx="-1",
                                                tpTriggerPxType="mark")), "51415")

    def open_swap_long(self, contracts="2"):
        self.place(instId="BTC-USDT-SWAP", tdMode="cross", side="buy", ordType="market", sz=contracts)
        self.assertEqual([p["pos"] for p in self.fake.positions()], [contracts])

    def swap_oco(self):
        return self.place_algo(instId="BTC-USDT-SWAP", tdMode="cross", side="sell", ordType="oco", sz="2",
                               reduceOnly=True, tpTriggerPx="43500", tpOrdPx="-1", slTriggerPx="42500", slOrdPx="-1")

    def test_an_oco_fires_its_take_profit_when_the_price_crosses_it(self):
        self.open_swap_long()                                    # 2 contracts at the ask, 43010.6
        algo_id = self.swap_oco()
        before = self.fake.balance("USDT")[0]
        self.fake.set_price("BTC-USDT-SWAP", "43499.9", "43500")  # last 43499.9: not yet
        self.assertEqual(self.algo_row(algo_id)["state"], "live")
        self.fake.set_price("BTC-USDT-SWAP", "43600.1", "43600.2")
        row = self.algo_row(algo_id)
        self.assertEqual((row["state"], row["actualSide"], row["actualSz"], row["actualPx"], row["failCode"]),
                         ("effective", "tp", "2", "43600.1", ""))
        self.assertTrue(row["triggerTime"].isdigit())
        child = self.order_row("BTC-USDT-SWAP", row["ordIdList"][0])
        self.assertEqual((child["algoId"], child["state"], child["side"], child["reduceOnly"], child["avgPx"],
                          child["ordType"]), (algo_id, "filled", "sell", "true", "43600.1", "market"))
        self.assertEqual(self.fake.positions(), [])
        margin, pnl = Decimal("43010.6") * 2 * Decimal("0.01") / 10, (Decimal("43600.1") - Decimal("43010.6")) * 2 / 100
        fee = Decimal("43600.1") * 2 * Decimal("0.01") * self.fake.fee_rate
        self.assertEqual(self.fake.balance("USDT"), (before + margin + pnl - fee, Decimal(0)))
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-pending?ordType=conditional,oco"), [])
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-history?ordType=conditional,oco&state=effective"),
                         [algo_id])
        self.fake.set_price("BTC-USDT-SWAP", "42000.1", "42000.2")     # the stop-loss leg is gone
        self.assertEqual(self.fake.trigger_check(), [])
        self.assertEqual(len(self.fake.orders()), 2)

    def test_an_oco_fires_its_stop_loss_and_the_take_profit_is_gone(self):
        self.open_swap_long()
        algo_id = self.swap_oco()
        self.fake.set_price("BTC-USDT-SWAP", "42400.1", "42400.2")
        row = self.algo_row(algo_id)
        self.assertEqual((row["state"], row["actualSide"]), ("effective", "sl"))
        self.assertEqual(self.order_row("BTC-USDT-SWAP", row["ordId"])["avgPx"], "42400.1")
        self.fake.set_price("BTC-USDT-SWAP", "44000.1", "44000.2")
        self.assertEqual(len(self.fake.orders()), 2)
        self.assertEqual(self.fake.positions(), [])

    def test_a_trigger_order_places_its_limit_child_when_the_price_reaches_it(self):
        algo_id = self.place_algo(instId="BTC-USDT", tdMode="cash", side="buy", ordType="trigger", sz="0.01",
                                  triggerPx="42000", orderPx="41990")
        self.fake.set_price("BTC-USDT", "42500.1", "42500.2")
        self.assertEqual((self.algo_row(algo_id)["state"], self.fake.orders()), ("live", []))
        self.fake.set_price("BTC-USDT", "41995.1", "41995.2")
        row = self.algo_row(algo_id)
        self.assertEqual((row["state"], row["actualSide"], row["actualPx"], row["actualSz"]),
                         ("effective", "", "41990", "0.01"))
        pending = self.rest("GET", "/api/v5/trade/orders-pending?instId=BTC-USDT")["data"]
        self.assertEqual([(o["ordId"], o["px"], o["state"], o["algoId"]) for o in pending],
                         [(row["ordId"], "41990", "live", algo_id)])
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9580.1"), Decimal("419.9")))
        rising = self.place_algo(instId="BTC-USDT", tdMode="cash", side="sell", ordType="trigger", sz="0.01",
                                 triggerPx="43000", orderPx="-1")   # placed below its trigger: fires on the way up
        self.fake.set_price("BTC-USDT", "42999.9", "43000")
        self.assertEqual(self.algo_row(rising)["state"], "live")
        self.fake.set_price("BTC-USDT", "43000.1", "43000.2")
        child = self.order_row("BTC-USDT", self.algo_row(rising)["ordId"])
        self.assertEqual((child["state"], child["ordType"], child["tgtCcy"], child["accFillSz"]),
                         ("filled", "market", "base_ccy", "0.01"))

    def test_a_conditional_order_with_both_legs_performs_only_its_stop_loss(self):
        algo_id = self.place_algo(instId="BTC-USDT", tdMode="cash", side="sell", ordType="conditional", sz="0.01",
                                  tpTriggerPx="44000", tpOrdPx="-1", slTriggerPx="42000", slOrdPx="-1")
        self.fake.set_price("BTC-USDT", "44100.1", "44100.2")
        self.assertEqual(self.algo_row(algo_id)["state"], "live")
        self.fake.set_price("BTC-USDT", "41900.1", "41900.2")
        row = self.algo_row(algo_id)
        self.assertEqual((row["state"], row["actualSide"]), ("effective", "sl"))
        self.assertEqual(self.order_row("BTC-USDT", row["ordId"])["avgPx"], "41900.1")

    def test_a_child_okx_would_refuse_ends_the_algo_order_failed(self):
        algo_id = self.place_algo(instId="BTC-USDT", tdMode="cash", side="buy", ordType="trigger", sz="1",
                                  triggerPx="42000", orderPx="-1")      # 1 BTC: more than the 10000 USDT
        self.fake.set_price("BTC-USDT", "41900.1", "41900.2")
        row = self.algo_row(algo_id)
        self.assertEqual((row["state"], row["failCode"], row["ordIdList"], row["actualSz"]),
                         ("order_failed", "51008", [], "0"))
        self.assertEqual(self.fake.orders(), [])
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-history?ordType=trigger&state=order_failed"), [algo_id])
        reduce_only = self.swap_oco()                                   # no position to reduce
        self.fake.set_price("BTC-USDT-SWAP", "43600.1", "43600.2")
        self.assertEqual((self.algo_row(reduce_only)["state"], self.algo_row(reduce_only)["failCode"]),
                         ("order_failed", "51169"))

    def test_amend_algos_changes_a_leg_and_deletes_one_with_0(self):
        algo_id = self.place_algo(**dict(SPOT_SELL_OCO, algoClOrdId="ocoA"))
        amend = "/api/v5/trade/amend-algos"
        answer = self.rest("POST", amend, {"instId": "BTC-USDT", "algoId": algo_id, "newSlTriggerPx": "41500",
                                           "reqId": "r1"})
        self.assertEqual(answer, {"code": "0", "msg": "", "data": [{"algoClOrdId": "ocoA", "algoId": algo_id,
                                                                     "reqId": "r1", "sCode": "0", "sMsg": ""}]})
        row = self.algo_row(algo_id)
        self.assertEqual((row["slTriggerPx"], row["slOrdPx"], row["tpTriggerPx"]), ("41500", "-1", "44000"))
        self.rest("POST", amend, {"instId": "BTC-USDT", "algoClOrdId": "ocoA", "newTpTriggerPx": "0"})
        row = self.algo_row(algo_id)
        self.assertEqual((row["tpTriggerPx"], row["tpOrdPx"], row["tpTriggerPxType"], row["slTriggerPx"]),
                         ("", "", "", "41500"))
        self.rest("POST", amend, {"instId": "BTC-USDT", "algoId": algo_id, "newSz": "0.02"})
        self.assertEqual(self.algo_row(algo_id)["sz"], "0.02")
        body = {"instId": "BTC-USDT", "algoId": algo_id}
        self.assertEqual(self.error("POST", amend, dict(body, newSlOrdPx="0"))[0], "51531")   # the last leg
        self.assertEqual(self.error("POST", amend, dict(body, newSlTriggerPx="44000"))[0], "51280")
        self.assertEqual(self.error("POST", amend, body)[0], "51500")
        self.assertEqual(self.error("POST", amend, {"instId": "BTC-USDT", "newSz": "1"})[0], "50015")
        self.assertEqual(self.error("POST", amend, dict(body, instId="ETH-USDT", newSz="1"))[0], "51503")
        trigger = self.place_algo(instId="BTC-USDT", tdMode="cash", side="buy", ordType="trigger", sz="0.01",
                                  triggerPx="42000", orderPx="41990")
        self.rest("POST", amend, {"instId": "BTC-USDT", "algoId": trigger, "newTriggerPx": "41000",
                                  "newOrdPx": "-1"})
        self.assertEqual((self.algo_row(trigger)["triggerPx"], self.algo_row(trigger)["ordPx"]), ("41000", "-1"))
        self.assertEqual(self.error("POST", amend, {"instId": "BTC-USDT", "algoId": trigger,
                                                    "newTriggerPx": "40000"})[0], "50014")
        self.fake.set_price("BTC-USDT", "41400.1", "41400.2")           # fires the oco's stop-loss
        self.assertEqual(self.algo_row(algo_id)["state"], "effective")
        self.assertEqual(self.error("POST", amend, dict(body, newSz="0.03")),
                         ("51503", "Your order has already been filled or canceled."))

    def test_cancel_algos_takes_an_array_of_up_to_10(self):
        first, second = self.place_algo(**SPOT_SELL_OCO), self.place_algo(**SPOT_SELL_OCO)
        path = "/api/v5/trade/cancel-algos"
        self.assertEqual(self.error("POST", path, {"instId": "BTC-USDT", "algoId": first}, status=400)[0], "50002")
        answer = self.rest("POST", path, [{"instId": "BTC-USDT", "algoId": first},
                                          {"instId": "BTC-USDT", "algoId": "123"}])
        self.assertEqual((answer["code"], [(r["algoId"], r["sCode"]) for r in answer["data"]]),
                         ("2", [(first, "0"), ("123", "51400")]))
        answer = self.rest("POST", path, [{"instId": "BTC-USDT", "algoId": first}])
        self.assertEqual((answer["code"], answer["data"][0]["sCode"]), ("1", "51400"))
        self.assertEqual(self.rest("POST", path, [{"instId": "BTC-USDT"}])["data"][0]["sCode"], "50015")
        self.assertEqual(self.error("POST", path, [{"instId": "BTC-USDT", "algoId": second}] * 11, status=400)[0],
                         "51406")
        self.assertEqual(self.error("POST", path, [], status=400)[0], "50014")
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-history?ordType=oco&state=canceled"), [first])
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-pending?ordType=oco"), [second])

    def test_pending_algo_orders_page_over_more_than_100(self):
        placed = {self.place_algo(**dict(SPOT_SELL_OCO, ordType="conditional", slTriggerPx="", slOrdPx=""))
                  for _ in range(130)}
        path = "/api/v5/trade/orders-algo-pending?ordType=conditional"
        first = self.ids(path)
        self.assertEqual(len(first), 100)
        self.assertEqual(first, sorted(first, key=int, reverse=True))
        rest = self.ids(path + "&after=" + first[-1])
        self.assertEqual((len(rest), set(first) | set(rest)), (30, placed))
        newer = self.ids(path + "&limit=5&before=" + rest[0])
        self.assertEqual(len(newer), 5)
        self.assertTrue(all(int(algo_id) > int(rest[0]) for algo_id in newer))
        self.assertEqual(self.error("GET", path + "&limit=101", status=400)[0], "51000")

    def test_history_filters_by_state_instrument_type_and_age(self):
        effective = self.place_algo(**SPOT_SELL_OCO)
        self.fake.set_price("BTC-USDT", "44000.1", "44000.2")      # fires its take-profit
        canceled = self.place_algo(**dict(SPOT_SELL_OCO, tpTriggerPx="46000"))
        failed = self.swap_oco()                                    # fires without a position: order_failed
        self.fake.set_price("BTC-USDT-SWAP", "43600.1", "43600.2")
        live = self.place_algo(**dict(SPOT_SELL_OCO, tpTriggerPx="46000"))
        swap = self.place_algo(instId="BTC-USDT-SWAP", tdMode="cross", side="buy", ordType="conditional", sz="1",
                               slTriggerPx="45000", slOrdPx="-1")
        cancel = [{"instId": "BTC-USDT", "algoId": canceled}, {"instId": "BTC-USDT-SWAP", "algoId": swap}]
        self.assertEqual(self.rest("POST", "/api/v5/trade/cancel-algos", cancel)["code"], "0")
        path = "/api/v5/trade/orders-algo-history?ordType=conditional,oco"
        self.assertEqual(self.error("GET", path, status=400)[0], "50015")
        self.assertEqual(self.error("GET", path + "&state=live", status=400)[0], "51000")
        self.assertEqual(self.ids(path + "&state=effective"), [effective])
        self.assertEqual(self.ids(path + "&state=canceled"), [swap, canceled])
        self.assertEqual(self.ids(path + "&state=canceled&instId=BTC-USDT"), [canceled])
        self.assertEqual(self.ids(path + "&state=canceled&instType=SWAP"), [swap])
        self.assertEqual(self.ids(path + "&state=order_failed"), [failed])
        self.assertEqual(self.ids(path + "&algoId=" + live), [])          # still pending
        self.assertEqual(self.ids(path + "&algoId=" + effective), [effective])
        self.assertEqual(self.ids("/api/v5/trade/orders-algo-history?ordType=trigger&state=canceled"), [])
        self.fake.accounts[KEY]["algos"][canceled]["cTime"] = str(self.fake.now_ms() - 91 * DAY_MS)
        self.assertEqual(self.ids(path + "&state=canceled"), [swap])      # the last 3 months only
        self.assertEqual(self.error("GET", "/api/v5/trade/order-algo?algoId=" + canceled),
                         ("51603", "Order does not exist."))
        self.assertEqual(self.error("GET", "/api/v5/trade/order-algo?algoClOrdId=nope")[0], "51603")
        self.assertEqual(self.error("GET", "/api/v5/trade/order-algo", status=400)[0], "50015")

    def test_algo_endpoints_have_okx_rate_limits(self):
        self.fake.enforce_rate_limits = True
        for _ in range(20):                                  # 20 / 2 s per key and instrument
            self.place_algo(**SPOT_SELL_OCO)
        self.assertEqual(self.error("POST", "/api/v5/trade/order-algo", SPOT_SELL_OCO, status=429)[0], "50011")
        self.place_algo(**dict(SPOT_SELL_OCO, instId="ETH-USDT", tpTriggerPx="3000", slTriggerPx="2900"))
        cancel = [{"instId": "BTC-USDT", "algoId": "1"}]
        for _ in range(20):
            self.rest("POST", "/api/v5/trade/cancel-algos", cancel)
        self.assertEqual(self.error("POST", "/api/v5/trade/cancel-algos", cancel, status=429)[0], "50011")

    def test_a_reset_after_processing_still_places_the_algo_order(self):
        self.fake.fault("/api/v5/trade/order-algo", "reset_after_process")
        body = dict(SPOT_SELL_OCO, algoClOrdId="lost1")
        with self.assertRaises((OSError, http.client.HTTPException)):
            okx_request(self.fake.base_url, "POST", "/api/v5/trade/order-algo", body)
        self.assertEqual([(a["algoClOrdId"], a["state"]) for a in self.fake.algo_orders()], [("lost1", "live")])
        found = self.rest("GET", "/api/v5/trade/order-algo?algoClOrdId=lost1")["data"]
        self.assertEqual(found[0]["algoId"], self.fake.algo_orders()[0]["algoId"])
        self.assertEqual(self.algo_error(**body), "51065")


class FakeAmendSelfTest(FakeTradeTestCase):
    """amend-order on the fake: accepted means sCode 0; the outcome is on the order (and its push fields)."""

    def spot_buy(self, **extra):
        body = dict({"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000",
                     "sz": "0.01"}, **extra)
        return self.place(**body)

    def amend(self, **body):
        answer = self.rest("POST", "/api/v5/trade/amend-order", dict({"instId": "BTC-USDT"}, **body))
        self.assertEqual((answer["code"], answer["data"][0]["sCode"]), ("0", "0"), answer)
        return answer

    def amend_error(self, **body):
        return self.error("POST", "/api/v5/trade/amend-order", dict({"instId": "BTC-USDT"}, **body))[0]

    def test_amend_changes_price_and_size_and_what_the_order_freezes(self):
        ord_id = self.spot_buy(clOrdId="am1")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9700"), Decimal("300")))
        answer = self.amend(ordId=ord_id, newPx="31000", newSz="0.02", reqId="q1")
        row = answer["data"][0]
        self.assertEqual({name: row[name] for name in ("ordId", "clOrdId", "reqId", "sCode", "sMsg")},
                         {"ordId": ord_id, "clOrdId": "am1", "reqId": "q1", "sCode": "0", "sMsg": ""})
        self.assertTrue(answer["inTime"].isdigit() and answer["outTime"].isdigit())
        order = self.order_row("BTC-USDT", ord_id)
        self.assertEqual((order["px"], order["sz"], order["state"]), ("31000", "0.02", "live"))
        self.assertNotIn("amendResult", order)                   # REST rows have no push-only fields
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9380"), Decimal("620")))
        self.assertEqual(self.fake.amend_state(ord_id), {"amendResult": "0", "reqId": "q1", "code": "0", "msg": ""})
        self.amend(clOrdId="am1", newSz="0.005")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9845"), Decimal("155")))
        self.assertEqual(self.fake.amend_state(ord_id)["reqId"], "")

    def test_amend_recomputes_the_margin_of_a_contract_order(self):
        ord_id = self.place(instId="BTC-USDT-SWAP", tdMode="cross", side="buy", ordType="limit", px="42000", sz="1")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9958"), Decimal("42")))     # 1 x 0.01 x 42000 / 10
        self.amend(instId="BTC-USDT-SWAP", ordId=ord_id, newSz="3", newPx="41000")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("10000") - Decimal("123"), Decimal("123")))

    def test_a_new_price_that_crosses_the_book_fills_at_once(self):
        ord_id = self.place(instId="BTC-USDT", tdMode="cash", side="sell", ordType="limit", px="44000", sz="0.01")
        self.assertEqual(self.fake.balance("BTC"), (Decimal("0.49"), Decimal("0.01")))
        self.amend(ordId=ord_id, newPx="43000")                   # at or under the bid, 43000.1
        order = self.order_row("BTC-USDT", ord_id)
        self.assertEqual((order["state"], order["px"], order["avgPx"], order["accFillSz"]),
                         ("filled", "43000", "43000.1", "0.01"))
        self.assertEqual(self.fake.balance("BTC"), (Decimal("0.49"), Decimal("0")))
        self.assertEqual(self.fake.balance("USDT")[0], Decimal("10000") + Decimal("430.001") * Decimal("0.999"))

    def test_a_new_size_at_or_under_what_filled_ends_the_order_filled(self):
        ord_id = self.spot_buy()
        self.fake.fill(ord_id, sz="0.004")
        self.assertEqual(self.fake.balance("USDT")[1], Decimal("180"))
        self.amend(ordId=ord_id, newSz="0.004")
        order = self.order_row("BTC-USDT", ord_id)
        self.assertEqual((order["state"], order["sz"], order["accFillSz"]), ("filled", "0.004", "0.004"))
        self.assertEqual(self.fake.balance("USDT")[1], Decimal("0"))
        self.assertEqual(self.amend_error(ordId=ord_id, newSz="0.01"), "51503")

    def test_what_cannot_be_amended(self):
        ord_id = self.spot_buy()
        self.assertEqual(self.error("POST", "/api/v5/trade/amend-order",
                                    {"instId": "BTC-USDT", "ordId": ord_id, "newPx": "30000.05"}),
                         ("51000", "Parameter newPx error"))                   # off the 0.1 tick
        self.assertEqual(self.amend_error(ordId=ord_id), "51500")
        self.assertEqual(self.amend_error(newPx="31000"), "50014")
        self.assertEqual(self.amend_error(ordId=ord_id, newSz="0.000000001"), "51121")   # off the lot size
        self.assertEqual(self.amend_error(ordId=ord_id, newSz="1e-3"), "51000")
        self.assertEqual(self.amend_error(ordId="1234567890123456789", newPx="31000"), "51503")
        self.assertEqual(self.amend_error(ordId=ord_id, newSz="1"), "51502")  # 30000 USDT: more than there is
        self.assertEqual(self.amend_error(ordId=ord_id, newPx="31000", cxlOnFail="yes"), "51000")
        post_only = self.spot_buy(ordType="post_only")
        self.assertEqual(self.amend_error(ordId=post_only, newPx="43000.2"), "51511")
        self.rest("POST", "/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": ord_id})
        self.assertEqual(self.error("POST", "/api/v5/trade/amend-order",
                                    {"instId": "BTC-USDT", "ordId": ord_id, "newPx": "31000"}),
                         ("51503", "Your order has already been filled or canceled."))

    def test_fail_next_amend_is_accepted_then_fails(self):
        ord_id = self.spot_buy()
        self.fake.fail_next_amend = ("51008", "Order failed. Insufficient USDT balance in account.")
        self.amend(ordId=ord_id, newPx="31000", reqId="f1")
        self.assertIsNone(self.fake.fail_next_amend)
        order = self.order_row("BTC-USDT", ord_id)
        self.assertEqual((order["px"], order["state"]), ("30000", "live"))
        self.assertEqual(self.fake.amend_state(ord_id),
                         {"amendResult": "-1", "reqId": "f1", "code": "51008",
                          "msg": "Order failed. Insufficient USDT balance in account."})
        self.fake.fail_next_amend = ("51008", "Order failed. Insufficient USDT balance in account.")
        self.amend(ordId=ord_id, newPx="31000", reqId="f2", cxlOnFail=True)
        self.assertEqual(self.order_row("BTC-USDT", ord_id)["state"], "canceled")
        self.assertEqual(self.fake.amend_state(ord_id)["amendResult"], "1")
        self.assertEqual(self.fake.balance("USDT"), (Decimal("10000"), Decimal("0")))


class FakeBatchSelfTest(FakeTradeTestCase):
    """batch-orders and cancel-batch-orders: arrays of up to 20, one answer row each."""

    SPOT_BUY = {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000",
                "sz": "0.01"}

    def test_batch_orders_answer_each_order(self):
        swap_sell = {"instId": "BTC-USDT-SWAP", "tdMode": "cross", "side": "sell", "ordType": "limit",
                     "px": "45000", "sz": "1"}
        answer = self.rest("POST", "/api/v5/trade/batch-orders",
                           [self.SPOT_BUY, dict(self.SPOT_BUY, sz="abc"), swap_sell])
        self.assertEqual((answer["code"], answer["msg"]), ("2", "Bulk operation partially succeeded."))
        self.assertEqual([row["sCode"] for row in answer["data"]], ["0", "51000", "0"])
        self.assertTrue(answer["inTime"].isdigit())
        placed = [row["ordId"] for row in answer["data"] if row["ordId"]]
        self.assertEqual(sorted(placed), sorted(o["ordId"] for o in self.fake.orders()))
        both = self.rest("POST", "/api/v5/trade/batch-orders",
                         [dict(self.SPOT_BUY, clOrdId="b1"), dict(self.SPOT_BUY, clOrdId="b1")])
        self.assertEqual((both["code"], [row["sCode"] for row in both["data"]]), ("2", ["0", "51016"]))
        self.assertEqual(self.rest("POST", "/api/v5/trade/batch-orders", [self.SPOT_BUY] * 2)["code"], "0")
        failed = self.rest("POST", "/api/v5/trade/batch-orders", [dict(self.SPOT_BUY, instId="NOPE-USDT")])
        self.assertEqual((failed["code"], failed["msg"], failed["data"][0]["sCode"]),
                         ("1", "All operations failed", "51001"))
        self.assertEqual(self.error("POST", "/api/v5/trade/batch-orders", [self.SPOT_BUY] * 21)[0], "51111")
        self.assertEqual(self.error("POST", "/api/v5/trade/batch-orders", self.SPOT_BUY, status=400)[0], "50002")

    def test_cancel_batch_orders_answer_each_order(self):
        placed = self.rest("POST", "/api/v5/trade/batch-orders", [self.SPOT_BUY, dict(self.SPOT_BUY, clOrdId="c2")])
        first = placed["data"][0]["ordId"]
        self.assertEqual(self.fake.balance("USDT"), (Decimal("9400"), Decimal("600")))
        answer = self.rest("POST", "/api/v5/trade/cancel-batch-orders",
                           [{"instId": "BTC-USDT", "ordId": first}, {"instId": "BTC-USDT", "clOrdId": "c2"},
                            {"instId": "BTC-USDT", "ordId": "42"}])
        self.assertEqual((answer["code"], [(row["sCode"], row["clOrdId"]) for row in answer["data"]]),
                         ("2", [("0", ""), ("0", "c2"), ("51400", "")]))
        self.assertEqual({o["state"] for o in self.fake.orders()}, {"canceled"})
        self.assertEqual(self.fake.balance("USDT"), (Decimal("10000"), Decimal("0")))
        self.assertEqual(self.error("POST", "/api/v5/trade/cancel-batch-orders",
                                    [{"instId": "BTC-USDT", "ordId": first}] * 21, status=400)[0], "51406")


class FakeOptionSelfTest(FakeTradeTestCase):
    """OPTION instruments of the fake (BTC-USD, ETH-USD): listing, market data, orders, positions."""

    def expected_expiries(self):
        """Fridays 08:00 UTC worked out day by day: the next one and the last of next month (+ 25 Dec 2026)."""
        now = dt.datetime.fromtimestamp(self.fake.now_ms() / 1000, dt.timezone.utc)
        days = [dt.datetime(now.year, now.month, now.day, 8, tzinfo=dt.timezone.utc) + dt.timedelta(days=n)
                for n in range(70)]
        fridays = [day for day in days if day.weekday() == 4]
        next_month = (now.month % 12) + 1
        expiries = {[day for day in fridays if day > now][0], [day for day in fridays if day.month == next_month][-1]}
        if dt.datetime(2026, 12, 25, 8, tzinfo=dt.timezone.utc) > now:
            expiries.add(dt.datetime(2026, 12, 25, 8, tzinfo=dt.timezone.utc))
        return {str(int(day.timestamp() * 1000)) for day in expiries}

    def test_option_instruments_and_tickers_need_the_instrument_family(self):
        for path in ("/api/v5/public/instruments?instType=OPTION", "/api/v5/market/tickers?instType=OPTION"):
            status, answer = okx_request(self.fake.base_url, "GET", path, signed=False)
            self.assertEqual((status, answer["code"], answer["msg"]),
                             (400, "50014", "Parameter instFamily can not be empty."))
        _, answer = okx_request(self.fake.base_url, "GET", "/api/v5/public/instruments?instType=OPTION&instFamily="
                                "BTC-USD", signed=False)
        rows = {row["instId"]: row for row in answer["data"]}
        self.assertEqual({(row["instType"], row["instFamily"], row["uly"]) for row in rows.values()},
                         {("OPTION", "BTC-USD", "BTC-USD")})
        self.assertEqual({row["expTime"] for row in rows.values()}, self.expected_expiries())
        self.assertEqual("BTC-USD-261225-100000-C" in rows, self.fake.now_ms() < 1798185600000)   # 25 Dec 2026 8:00
        row = rows[self.option_id("100000")]
        self.assertEqual({name: row[name] for name in ("optType", "stk", "ctVal", "ctMult", "ctValCcy", "settleCcy",
                                                       "tickSz", "lotSz", "minSz", "lever", "ctType")},
                         {"optType": "C", "stk": "100000", "ctVal": "1", "ctMult": "0.01", "ctValCcy": "BTC",
                          "settleCcy": "BTC", "tickSz": "0.0001", "lotSz": "1", "minSz": "1", "lever": "",
                          "ctType": ""})
        if "BTC-USD-261225-100000-C" in rows:
            self.assertEqual((rows["BTC-USD-261225-100000-C"]["expTime"], rows["BTC-USD-261225-100000-P"]["stk"]),
                             ("1798185600000", "100000"))
        strikes = {int(row["stk"]) for row in rows.values()}
        self.assertEqual(strikes, {41000, 42000, 43000, 44000, 45000, 100000})      # around 43000 and the fixed one
        for inst_id, row in rows.items():
            family, day, strike, kind = inst_id.rsplit("-", 3)
            self.assertEqual((family, strike, kind), ("BTC-USD", row["stk"], row["optType"]))
            expiry = dt.datetime.fromtimestamp(int(row["expTime"]) / 1000, dt.timezone.utc)
            self.assertEqual((expiry.strftime("%y%m%d"), expiry.hour, expiry.weekday()), (day, 8, 4))
        _, tickers = okx_request(self.fake.base_url, "GET", "/api/v5/market/tickers?instType=OPTION&instFamily=BTC-USD",
                                 signed=False)
        self.assertEqual({row["instId"] for row in tickers["data"]}, set(rows))
        for row in tickers["data"]:
            self.assertEqual((row["instType"], Decimal(row["bidPx"]) % Decimal("0.0001")), ("OPTION", 0))
            self.assertLess(Decimal(row["bidPx"]), Decimal(row["askPx"]))
        _, eth = okx_request(self.fake.base_url, "GET", "/api/v5/public/instruments?instType=OPTION&instFamily=ETH-USD",
                             signed=False)
        self.assertEqual({(row["ctMult"], row["settleCcy"]) for row in eth["data"]}, {("0.1", "ETH")})

    def test_option_market_data(self):
        inst_id = self.option_id()
        ticker = self.rest("GET", "/api/v5/market/ticker?instId=" + inst_id)["data"][0]
        self.assertEqual(ticker["instType"], "OPTION")
        self.assertTrue(0 < Decimal(ticker["last"]) < 1, ticker)
        book = self.rest("GET", "/api/v5/market/books?sz=400&instId=" + self.option_id("100000"))["data"][0]
        self.assertTrue(book["bids"] and all(Decimal(px) > 0 for px, _, _, _ in book["bids"]))
        self.assertEqual(len(book["asks"]), 400)
        self.assertEqual(len(self.rest("GET", "/api/v5/market/trades?limit=5&instId=" + inst_id)["data"]), 5)
        candles = self.rest("GET", "/api/v5/market/candles?bar=1H&limit=3&instId=" + inst_id)["data"]
        self.assertEqual([len(row) for row in candles], [9, 9, 9])
        self.assertTrue(all(0 < Decimal(px) < 1 for row in candles for px in row[1:5]))

    def test_an_option_fill_pays_the_premium_and_opens_a_net_position(self):
        inst_id = self.option_id()
        ticker = self.rest("GET", "/api/v5/market/ticker?instId=" + inst_id)["data"][0]
        ask, bid = Decimal(ticker["askPx"]), Decimal(ticker["bidPx"])
        self.fake.set_position_mode("long_short_mode")          # options stay net in either mode
        buy = self.place(instId=inst_id, tdMode="cross", side="buy", ordType="limit", px=fmt(ask), sz="2")
        premium = ask * 2 * Decimal("0.01")
        btc = Decimal("0.5") - premium - premium * self.fake.fee_rate
        self.assertEqual(self.fake.balance("BTC"), (btc, Decimal(0)))
        positions = self.rest("GET", "/api/v5/account/positions?instType=OPTION")["data"]
        self.assertEqual([(p["instId"], p["instType"], p["pos"], p["posSide"], p["avgPx"], p["mgnMode"])
                          for p in positions], [(inst_id, "OPTION", "2", "net", fmt(ask), "cross")])
        self.assertEqual([p["instId"] for p in self.rest("GET", "/api/v5/account/positions")["data"]], [inst_id])
        history = self.rest("GET", "/api/v5/trade/orders-history?instType=OPTION")["data"]
        self.assertEqual([(o["ordId"], o["instType"], o["state"]) for o in history], [(buy, "OPTION", "filled")])
        self.place(instId=inst_id, tdMode="cross", side="sell", ordType="limit", px=fmt(bid), sz="3")
        received = bid * 3 * Decimal("0.01")
        btc += received - received * self.fake.fee_rate - Decimal("0.01")          # 1 short contract's cover
        self.assertEqual(self.fake.balance("BTC"), (btc, Decimal("0.01")))
        position = self.rest("GET", "/api/v5/account/positions?instType=OPTION")["data"][0]
        self.assertEqual((position["pos"], position["avgPx"]), ("-1", fmt(bid)))
        resting = self.place(instId=inst_id, tdMode="cross", side="buy", ordType="limit", px="0.0001", sz="1")
        pending = self.rest("GET", "/api/v5/trade/orders-pending?instType=OPTION")["data"]
        self.assertEqual([(o["ordId"], o["instType"], o["px"]) for o in pending], [(resting, "OPTION", "0.0001")])
        self.assertEqual(self.fake.balance("BTC")[1], Decimal("0.010001"))
        market = {"instId": inst_id, "tdMode": "cross", "side": "buy", "ordType": "market", "sz": "1"}
        self.assertEqual(self.error("POST", "/api/v5/trade/order", market)[0], "51066")
        self.assertEqual(self.error("POST", "/api/v5/trade/order", dict(market, ordType="limit", px="0.00015"))[0],
                         "51000")



SWAP_SYMBOLS = {"BTC_USDT.swap", "ETH_USDT.swap", "BTC_USD.swap"}
POSITION_FIELDS = {"symbol", "margin_level", "amount", "frozen_amount", "price", "profit", "margin", "type",
                   "contract_type"}


# ---- Futures and perpetual swaps ----

class FuturesTestCase(PluginTestCase):
    """PluginTestCase with helpers for contracts: instrument ids, order bodies, leverage as OKX keeps it."""

    def futures_inst_id(self, family, alias):
        """The instId OKX lists for a delivery contract type, e.g. ("BTC-USD", "quarter") -> "BTC-USD-261225"."""
        status, answer = okx_request(self.fake.base_url, "GET", "/api/v5/public/instruments?instType=FUTURES",
                                     signed=False)
        ids = [row["instId"] for row in answer["data"] if row["instFamily"] == family and row["alias"] == alias]
        self.assertEqual(len(ids), 1, (family, alias))
        return ids[0]

    def order_bodies(self):
        """The JSON bodies of every order OKX received, oldest first."""
        return [json.loads(request["body"]) for request in self.okx_calls("/api/v5/trade/order")
                if request["method"] == "POST"]

    def leverage_bodies(self):
        return [json.loads(request["body"]) for request in self.okx_calls("/api/v5/account/set-leverage")]

    def lever(self, inst_id, mgn_mode="cross"):
        """{posSide: lever} of an instrument as the fake's /account/leverage-info reports it."""
        status, answer = okx_request(self.fake.base_url, "GET",
                                     "/api/v5/account/leverage-info?instId=%s&mgnMode=%s" % (inst_id, mgn_mode))
        self.assertEqual(answer["code"], "0", answer)
        return {row["posSide"]: row["lever"] for row in answer["data"]}

    def market(self, symbol, type, amount, **params):
        """A market order through the plugin (it fills at once on the fake); returns the docker order id."""
        return self.place(symbol=symbol, type=type, price="-1", amount=amount, **params)

    def use_plugin(self, **options):
        """Serve the rest of the test from a second plugin started with `options` (e.g. margin_mode)."""
        server = self.start_plugin(**options)
        self.docker = Docker(server.server_address[1])
        self.addCleanup(self.docker.close)


class FuturesMarketDataTest(FuturesTestCase):
    """Contract symbols and the market-data methods for swaps and delivery futures."""

    def test_swap_symbols_map_to_swap_instruments(self):
        for symbol, inst_id, bid in (("BTC_USDT.swap", "BTC-USDT-SWAP", "43010.5"),
                                     ("BTC_USD.swap", "BTC-USD-SWAP", "43012.3"),
                                     ("eth_usdt.SWAP", "ETH-USDT-SWAP", "2923.5")):
            answer = self.docker.call("ticker", {"symbol": symbol})
            self.assertEqual(self.okx_calls("/api/v5/market/ticker")[-1]["query"], "instId=" + inst_id)
            self.assertEqual(answer["raw"]["instId"], inst_id)
            self.assertEqual(answer["data"]["buy"], bid)
        self.assertEqual(answer["data"]["symbol"], "ETH_USDT.swap")

    def test_ticker_volume_of_a_contract_is_in_contracts(self):
        answer = self.docker.call("ticker", {"symbol": "BTC_USDT.swap"})
        self.assertEqual(answer["data"]["vol"], answer["raw"]["vol24h"])
        self.assertEqual(answer["data"]["symbol"], "BTC_USDT.swap")

    def test_delivery_contract_types_resolve_through_the_alias(self):
        contracts = {"%s.%s" % (family.replace("-", "_"), alias): self.futures_inst_id(family, alias)
                     for family in ("BTC-USD", "BTC-USDT")
                     for alias in ("this_week", "next_week", "quarter", "next_quarter")}
        self.assertEqual(len(set(contracts.values())), 8)
        self.fake.clear_requests()
        for symbol, inst_id in contracts.items():
            ticker = self.data("ticker", {"symbol": symbol})
            self.assertEqual(self.okx_calls("/api/v5/market/ticker")[-1]["query"], "instId=" + inst_id)
            self.assertEqual(ticker["symbol"], symbol)
        self.assertEqual(len(self.okx_calls("/api/v5/public/instruments")), 1)     # the list is cached

    def test_contract_type_may_come_as_a_separate_param(self):
        quarter = self.futures_inst_id("BTC-USD", "quarter")
        for params, inst_id, symbol in (({"symbol": "BTC_USD", "contract_type": "quarter"}, quarter, "BTC_USD.quarter"),
                                        ({"symbol": "BTC_USDT", "contractType": "swap"}, "BTC-USDT-SWAP",
                                         "BTC_USDT.swap")):
            self.assertEqual(self.data("ticker", params)["symbol"], symbol)
            self.assertEqual(self.okx_calls("/api/v5/market/ticker")[-1]["query"], "instId=" + inst_id)

    def test_depth_trades_and_records_of_contracts(self):
        next_week = self.futures_inst_id("BTC-USD", "next_week")
        depth = self.data("depth", {"symbol": "BTC_USDT.swap", "limit": "5"})
        self.assertEqual((len(depth["asks"]), len(depth["bids"])), (5, 5))
        self.assertEqual(depth["asks"][0][0], "43010.6")
        self.assertEqual(self.okx_calls("/api/v5/market/books")[-1]["query"], "instId=BTC-USDT-SWAP&sz=5")
        trades = self.data("trades", {"symbol": "BTC_USD.swap", "limit": "10"})
        self.assertEqual(len(trades), 10)
        self.assertIn("instId=BTC-USD-SWAP", self.okx_calls("/api/v5/market/trades")[-1]["query"])
        bars = self.data("records", {"symbol": "BTC_USD", "contract_type": "next_week", "period": 60, "limit": 3})
        self.assertEqual(len(bars), 3)
        self.assertIn("instId=%s&" % next_week, self.okx_calls("/api/v5/market/candles")[-1]["query"])

    def test_tickers_of_swaps_list_swap_symbols(self):
        tickers = self.data("tickers", {"contract_type": "swap"})
        self.assertEqual({ticker["symbol"] for ticker in tickers}, SWAP_SYMBOLS)
        self.assertEqual(self.okx_calls("/api/v5/market/tickers")[-1]["query"], "instType=SWAP")
        btc = [ticker for ticker in tickers if ticker["symbol"] == "BTC_USDT.swap"][0]
        self.assertEqual((btc["buy"], btc["sell"]), ("43010.5", "43010.6"))

    def test_tickers_of_futures_name_each_contract_by_its_type(self):
        tickers = self.data("tickers", {"contractType": "futures"})
        self.assertEqual({ticker["symbol"] for ticker in tickers},
                         {"%s.%s" % (pair, alias) for pair in ("BTC_USD", "BTC_USDT")
                          for alias in ("this_week", "next_week", "quarter", "next_quarter")})
        self.assertEqual(self.okx_calls("/api/v5/market/tickers")[-1]["query"], "instType=FUTURES")

    def test_markets_of_swaps_carry_ctval_and_sizes_in_contracts(self):
        markets = self.data("markets", {"contract_type": "swap"})
        self.assertEqual(set(markets), SWAP_SYMBOLS)
        linear, inverse = markets["BTC_USDT.swap"], markets["BTC_USD.swap"]
        self.assertEqual((linear["symbol"], linear["baseAsset"], linear["quoteAsset"]),
                         ("BTC_USDT.swap", "BTC", "USDT"))
        self.assertEqual((linear["ctVal"], linear["ctValCcy"]), ("0.01", "BTC"))
        self.assertEqual((linear["amountSize"], linear["amountPrecision"], linear["minQty"]), ("1", 0, "1"))
        self.assertEqual((linear["tickSize"], linear["pricePrecision"]), ("0.1", 1))
        self.assertEqual((inverse["ctVal"], inverse["ctValCcy"], inverse["quoteAsset"]), ("100", "USD", "USD"))
        self.assertEqual(self.okx_calls("/api/v5/public/instruments")[-1]["query"], "instType=SWAP")

    def test_markets_of_futures_are_keyed_by_contract_type(self):
        markets = self.data("markets", {"contract_type": "futures"})
        quarter = markets["BTC_USD.quarter"]
        self.assertEqual((quarter["symbol"], quarter["ctVal"], quarter["ctValCcy"], quarter["minQty"]),
                         ("BTC_USD.quarter", "100", "USD", "1"))
        self.assertIn("BTC_USDT.next_quarter", markets)
        self.assertEqual(len(markets), 8)

    def test_unknown_contract_type_is_an_error_without_calling_okx(self):
        self.assertIn("'monthly'", self.error("ticker", {"symbol": "BTC_USDT.monthly"}))
        self.assertIn("'perpetual'", self.error("ticker", {"symbol": "BTC_USDT", "contract_type": "perpetual"}))
        self.assertIn("'monthly'", self.error("tickers", {"contract_type": "monthly"}))
        self.assertEqual(self.okx_calls("/api/v5/market/ticker"), [])
        self.assertEqual(self.okx_calls("/api/v5/market/tickers"), [])

    def test_contract_type_not_listed_for_the_pair_is_an_error(self):
        error = self.error("ticker", {"symbol": "ETH_USDT.quarter"})     # the fake lists no ETH futures
        self.assertIn("quarter", error)
        self.assertIn("ETH_USDT", error)
        self.assertEqual(self.okx_calls("/api/v5/market/ticker"), [])


class PositionTest(FuturesTestCase):
    """positions (GetPositions, GetPosition): OKX positions in FMZ's Position shape, in both modes."""

    def assert_matches_okx(self, position, row):
        self.assertEqual(set(position), POSITION_FIELDS)
        self.assertEqual((position["price"], position["profit"], position["margin_level"]),
                         (row["avgPx"], row["upl"], row["lever"]))
        self.assertEqual(position["margin"], row["margin"] or row["imr"])
        self.assertGreater(Decimal(position["margin"]), 0)

    def test_net_long_position_in_fmz_shape(self):
        self.market("BTC_USDT.swap", "buy", "3")
        positions = self.data("positions", {"symbol": "BTC_USDT.swap"})
        self.assertEqual(len(positions), 1)
        position, row = positions[0], self.fake.positions()[0]
        self.assertEqual((position["symbol"], position["type"], position["amount"], position["frozen_amount"],
                          position["contract_type"]), ("BTC_USDT.swap", 0, "3", "0", "swap"))
        self.assert_matches_okx(position, row)
        self.assertEqual(self.okx_calls("/api/v5/account/positions")[-1]["query"], "instId=BTC-USDT-SWAP")

    def test_net_short_position_has_type_1_and_a_positive_amount(self):
        self.market("BTC_USDT.swap", "sell", "2")
        self.assertEqual(self.fake.positions()[0]["pos"], "-2")
        position = self.data("positions", {"symbol": "BTC_USDT.swap"})[0]
        self.assertEqual((position["type"], position["amount"]), (1, "2"))
        self.assert_matches_okx(position, self.fake.positions()[0])

    def test_long_short_mode_lists_each_side(self):
        self.fake.set_position_mode("long_short_mode")
        self.market("BTC_USDT.swap", "buy", "2")
        self.market("BTC_USDT.swap", "sell", "1")
        positions = self.data("positions", {"symbol": "BTC_USDT.swap"})
        self.assertEqual(sorted((p["type"], p["amount"]) for p in positions), [(0, "2"), (1, "1")])
        rows = {row["posSide"]: row for row in self.fake.positions()}
        for position in positions:
            self.assert_matches_okx(position, rows["short" if position["type"] else "long"])

    def test_frozen_amount_is_what_pending_closing_orders_hold(self):
        self.fake.set_position_mode("long_short_mode")
        self.market("BTC_USDT.swap", "buy", "3")
        self.place(symbol="BTC_USDT.swap", type="closebuy", price="50000", amount="1")    # rests above the ask
        position = self.data("positions", {"symbol": "BTC_USDT.swap"})[0]
        self.assertEqual((position["amount"], position["frozen_amount"]), ("3", "1"))

    def test_every_spelling_lists_swaps_and_futures(self):
        self.market("BTC_USDT.swap", "buy", "1")
        self.market("BTC_USD.quarter", "sell", "4")
        for method in ("positions", "GetPositions", "GetPosition", "getpositions"):
            positions = {p["symbol"]: p for p in self.data(method)}
            self.assertEqual(set(positions), {"BTC_USDT.swap", "BTC_USD.quarter"}, method)
        self.assertEqual((positions["BTC_USD.quarter"]["contract_type"], positions["BTC_USD.quarter"]["type"],
                          positions["BTC_USD.quarter"]["amount"]), ("quarter", 1, "4"))

    def test_contract_type_param_selects_the_delivery_contract(self):
        self.market("BTC_USD.quarter", "buy", "2")
        self.market("BTC_USD.swap", "buy", "5")
        positions = self.data("GetPosition", {"symbol": "BTC_USD", "contract_type": "quarter"})
        self.assertEqual([(p["symbol"], p["amount"]) for p in positions], [("BTC_USD.quarter", "2")])
        self.assertEqual(self.okx_calls("/api/v5/account/positions")[-1]["query"],
                         "instId=" + self.futures_inst_id("BTC-USD", "quarter"))

    def test_no_position_is_an_empty_list(self):
        self.assertEqual(self.data("positions", {"symbol": "BTC_USDT.swap"}), [])

    def test_isolated_position_reports_its_own_margin(self):
        self.use_plugin(margin_mode="isolated")
        self.market("BTC_USDT.swap", "buy", "2")
        row = self.fake.positions()[0]
        self.assertEqual((row["mgnMode"], row["imr"]), ("isolated", ""))
        position = self.data("positions", {"symbol": "BTC_USDT.swap"})[0]
        self.assertEqual(position["margin"], row["margin"])
        self.assertGreater(Decimal(position["margin"]), 0)

    def test_positions_of_a_spot_symbol_is_an_error_without_calling_okx(self):
        self.assertIn("spot", self.error("positions", {"symbol": "BTC_USDT"}))
        self.assertEqual(self.okx_calls("/api/v5/account/positions"), [])


class FuturesOrderTest(FuturesTestCase):
    """trade, orders, order, historyorders, cancel on swaps and delivery futures."""

    def trade_sides(self, symbol, types):
        """Place a market order of 1 contract for each (type, direction); the bodies OKX received."""
        for type, direction in types:
            params = {"direction": direction} if direction else {}
            self.market(symbol, type, "1", **params)
        return self.order_bodies()[-len(types):]

    def test_net_mode_opens_by_side_and_closes_with_reduce_only(self):
        bodies = self.trade_sides("BTC_USDT.swap", [("buy", None), ("closebuy", None), ("sell", None),
                                                    ("closesell", None)])
        self.assertEqual([(b["side"], b.get("reduceOnly", False)) for b in bodies],
                         [("buy", False), ("sell", True), ("sell", False), ("buy", True)])
        self.assertTrue(all("posSide" not in b and b["tdMode"] == "cross" for b in bodies), bodies)
        self.assertEqual(self.fake.positions(), [])
        self.assertEqual([o["state"] for o in self.fake.orders()], ["filled"] * 4)

    def test_long_short_mode_opens_and_closes_by_pos_side(self):
        self.fake.set_position_mode("long_short_mode")
        bodies = self.trade_sides("BTC_USDT.swap", [("buy", None), ("sell", None), ("closebuy", None),
                                                    ("closesell", None)])
        self.assertEqual([(b["side"], b["posSide"]) for b in bodies],
                         [("buy", "long"), ("sell", "short"), ("sell", "long"), ("buy", "short")])
        self.assertTrue(all("reduceOnly" not in b and b["tdMode"] == "cross" for b in bodies), bodies)
        self.assertEqual(self.fake.positions(), [])

    def test_direction_param_closes_with_buy_or_sell(self):
        bodies = self.trade_sides("BTC_USDT.swap", [("buy", "buy"), ("sell", "closebuy"), ("sell", "sell"),
                                                    ("buy", "closesell")])
        self.assertEqual([(b["side"], b.get("reduceOnly", False)) for b in bodies],
                         [("buy", False), ("sell", True), ("sell", False), ("buy", True)])
        self.fake.set_position_mode("long_short_mode")
        self.use_plugin()                          # a fresh plugin reads the new position mode
        bodies = self.trade_sides("BTC_USDT.swap", [("buy", None), ("sell", "closebuy")])
        self.assertEqual([(b["side"], b["posSide"]) for b in bodies], [("buy", "long"), ("sell", "long")])
        self.assertEqual(self.fake.positions(), [])

    def test_direction_that_contradicts_the_type_is_refused_before_okx(self):
        base = {"symbol": "BTC_USDT.swap", "price": "-1", "amount": "1"}
        self.assertIn("closebuy", self.error("trade", dict(base, type="buy", direction="closebuy")))
        self.assertIn("closesell", self.error("trade", dict(base, type="sell", direction="closesell")))
        self.assertIn("direction", self.error("trade", dict(base, type="buy", direction="hold")))
        self.assertIn("type", self.error("trade", dict(base, type="open")))
        self.assertEqual(self.okx_calls("/api/v5/trade/order"), [])

    def test_amount_is_contracts_and_prices_keep_their_digits(self):
        self.place(symbol="BTC_USDT.swap", type="buy", price="30000.1", amount="7")
        body = self.order_bodies()[-1]
        self.assertEqual((body["instId"], body["sz"], body["px"], body["ordType"]),
                         ("BTC-USDT-SWAP", "7", "30000.1", "limit"))
        self.assertEqual(self.fake.orders()[0]["sz"], "7")
        self.assertEqual(self.data("orders", {"symbol": "BTC_USDT.swap"})[0]["amount"], "7")

    def test_isolated_margin_mode_sends_isolated(self):
        self.use_plugin(margin_mode="isolated")
        self.market("BTC_USDT.swap", "sell", "2")
        self.market("BTC_USDT.swap", "closesell", "2")
        self.assertEqual([b["tdMode"] for b in self.order_bodies()], ["isolated", "isolated"])
        self.assertEqual([o["tdMode"] for o in self.fake.orders()], ["isolated", "isolated"])
        self.place(symbol="ETH_USDT", type="buy", price="2000", amount="0.01")
        self.assertEqual(self.order_bodies()[-1]["tdMode"], "cash")       # spot stays cash

    def test_position_mode_is_read_once_for_several_trades(self):
        self.fake.set_position_mode("long_short_mode")
        self.market("BTC_USDT.swap", "buy", "1")
        self.market("BTC_USD.swap", "sell", "1")
        self.place(symbol="BTC_USD.quarter", type="buy", price="30000", amount="1")
        self.market("BTC_USDT.swap", "closebuy", "1")
        self.assertEqual(len(self.okx_calls("/api/v5/account/config")), 1)
        self.assertEqual([b["posSide"] for b in self.order_bodies()], ["long", "short", "long", "long"])

    def test_spot_orders_ignore_the_position_mode(self):
        self.fake.set_position_mode("long_short_mode")
        self.place(symbol="BTC_USDT", type="buy", price="30000", amount="0.01")
        body = self.order_bodies()[-1]
        self.assertEqual(body["tdMode"], "cash")
        self.assertNotIn("posSide", body)
        self.assertNotIn("reduceOnly", body)

    def test_closing_what_is_not_open_answers_okx_code(self):
        error = self.error("trade", {"symbol": "BTC_USDT.swap", "type": "closebuy", "price": "-1", "amount": "1"})
        self.assertIn("OKX 51169", error)
        self.market("BTC_USDT.swap", "buy", "1")
        self.assertIn("OKX 51169", self.error("trade", {"symbol": "BTC_USDT.swap", "type": "closesell",
                                                         "price": "-1", "amount": "1"}))
        self.assertIn("OKX 51170", self.error("trade", {"symbol": "BTC_USDT.swap", "type": "closebuy",
                                                         "price": "-1", "amount": "2"}))
        self.assertEqual(self.fake.positions()[0]["pos"], "1")

    def test_closing_what_is_not_open_in_long_short_mode_answers_okx_code(self):
        self.fake.set_position_mode("long_short_mode")
        self.market("BTC_USDT.swap", "sell", "1")
        error = self.error("trade", {"symbol": "BTC_USDT.swap", "type": "sell", "direction": "closebuy",
                                     "price": "-1", "amount": "1"})
        self.assertIn("OKX 51169", error)
        self.assertEqual(self.order_bodies()[-1]["posSide"], "long")

    def test_swap_orders_list_with_offset_and_cancel(self):
        self.market("BTC_USDT.swap", "buy", "2")
        opening = self.place(symbol="BTC_USDT.swap", type="buy", price="30000", amount="3")
        closing = self.place(symbol="BTC_USDT.swap", type="closebuy", price="50000", amount="1")
        self.place(symbol="BTC_USDT", type="buy", price="30000", amount="0.01")
        orders = {o["id"]: o for o in self.data("orders", {"symbol": "BTC_USDT.swap"})}
        self.assertEqual(set(orders), {opening, closing})
        self.assertEqual(orders[opening], {"id": opening, "symbol": "BTC_USDT.swap", "amount": "3", "price": "30000",
                                           "deal_amount": "0", "avg_price": "0", "type": "buy", "status": "pending",
                                           "offset": "open"})
        self.assertEqual((orders[closing]["type"], orders[closing]["offset"]), ("sell", "close"))
        self.assertEqual(self.okx_calls("/api/v5/trade/orders-pending")[-1]["query"],
                         "instType=SWAP&instId=BTC-USDT-SWAP&limit=100")
        self.assertEqual(self.data("order", {"id": closing})["offset"], "close")
        self.assertIs(self.data("cancel", {"id": closing, "symbol": "BTC_USDT.swap"}), True)
        self.assertEqual(self.data("order", {"id": closing})["status"], "canceled")
        self.assertEqual([o["id"] for o in self.data("orders", {"symbol": "BTC_USDT.swap"})], [opening])

    def test_long_short_mode_orders_tell_open_from_close(self):
        self.fake.set_position_mode("long_short_mode")
        self.market("BTC_USDT.swap", "sell", "2")
        closing = self.place(symbol="BTC_USDT.swap", type="closesell", price="30000", amount="2")
        opening = self.place(symbol="BTC_USDT.swap", type="buy", price="30000", amount="1")
        order = self.data("order", {"id": closing})
        self.assertEqual((order["type"], order["offset"], order["symbol"]), ("buy", "close", "BTC_USDT.swap"))
        self.assertEqual(self.data("order", {"id": opening})["offset"], "open")

    def test_delivery_futures_order_round_trip(self):
        quarter = self.futures_inst_id("BTC-USD", "quarter")
        order_id = self.place(symbol="BTC_USD", contract_type="quarter", type="sell", price="60000", amount="5")
        self.assertTrue(order_id.startswith(quarter + ","), order_id)
        self.assertEqual(self.order_bodies()[-1]["instId"], quarter)
        listed = self.data("orders", {"symbol": "BTC_USD.quarter"})
        self.assertEqual([(o["id"], o["symbol"], o["amount"], o["offset"]) for o in listed],
                         [(order_id, "BTC_USD.quarter", "5", "open")])
        bare = order_id.split(",")[1]
        self.assertEqual(self.data("order", {"id": bare, "symbol": "BTC_USD.quarter"})["id"], order_id)
        self.fake.fill(bare, sz="2")
        order = self.data("order", {"id": order_id})
        self.assertEqual((order["status"], order["deal_amount"], order["avg_price"]), ("partial-filled", "2", "60000"))
        self.assertIs(self.data("cancel", {"id": order_id}), True)
        history = self.data("historyorders", {"symbol": "BTC_USD.quarter", "since": 0, "limit": 0})
        self.assertEqual([(o["id"], o["status"], o["symbol"]) for o in history],
                         [(order_id, "partial-canceled", "BTC_USD.quarter")])
        self.assertIn("instType=FUTURES", self.okx_calls("/api/v5/trade/orders-history")[-1]["query"])

    def test_historyorders_of_a_swap(self):
        self.market("BTC_USDT.swap", "buy", "2")
        closed = self.market("BTC_USDT.swap", "closebuy", "2")
        self.place(symbol="BTC_USDT", type="buy", price="-1", amount="100")
        history = self.data("historyorders", {"symbol": "BTC_USDT.swap", "since": 0, "limit": 0})
        self.assertEqual([(o["id"], o["status"], o["offset"], o["deal_amount"]) for o in history][0],
                         (closed, "filled", "close", "2"))
        self.assertEqual([o["offset"] for o in history], ["close", "open"])
        self.assertEqual({o["symbol"] for o in history}, {"BTC_USDT.swap"})
        query = urllib.parse.parse_qs(self.okx_calls("/api/v5/trade/orders-history")[-1]["query"])
        self.assertEqual((query["instType"], query["instId"]), (["SWAP"], ["BTC-USDT-SWAP"]))


class LeverageTest(FuturesTestCase):
    """SetMarginLevel (margin_level, setleverage) and the leverage param of trade."""

    def test_set_margin_level_sets_the_contract_leverage(self):
        self.assertIs(self.data("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "20"}), True)
        self.assertEqual(self.leverage_bodies(), [{"instId": "BTC-USDT-SWAP", "lever": "20", "mgnMode": "cross"}])
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "20"})
        self.market("BTC_USDT.swap", "buy", "1")
        self.assertEqual(self.data("positions", {"symbol": "BTC_USDT.swap"})[0]["margin_level"], "20")

    def test_every_spelling_of_the_method_and_its_param(self):
        lever = 10
        for method in ("SetMarginLevel", "setmarginlevel", "margin_level", "MarginLevel", "setleverage",
                       "SetLeverage"):
            for name in ("marginLevel", "margin_level", "leverage"):
                lever += 1
                self.assertIs(self.data(method, {"symbol": "BTC_USD.swap", name: str(lever)}), True, (method, name))
                self.assertEqual(self.leverage_bodies()[-1]["lever"], str(lever), (method, name))
        self.assertEqual(self.lever("BTC-USD-SWAP"), {"net": str(lever)})
        self.assertIn("marginLevel", self.error("SetMarginLevel", {"symbol": "BTC_USD.swap"}))

    def test_delivery_contract_leverage_by_contract_type(self):
        quarter = self.futures_inst_id("BTC-USDT", "quarter")
        self.data("SetMarginLevel", {"symbol": "BTC_USDT", "contract_type": "quarter", "leverage": "3"})
        self.assertEqual(self.leverage_bodies()[-1]["instId"], quarter)
        self.assertEqual(self.lever(quarter), {"net": "3"})

    def test_isolated_margin_in_long_short_mode_sets_both_sides(self):
        self.fake.set_position_mode("long_short_mode")
        self.use_plugin(margin_mode="isolated")
        self.assertIs(self.data("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "7"}), True)
        self.assertEqual(sorted((b["posSide"], b["mgnMode"], b["lever"]) for b in self.leverage_bodies()),
                         [("long", "isolated", "7"), ("short", "isolated", "7")])
        self.assertEqual(self.lever("BTC-USDT-SWAP", "isolated"), {"long": "7", "short": "7"})

    def test_isolated_margin_in_net_mode_sends_no_pos_side(self):
        self.use_plugin(margin_mode="isolated")
        self.data("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "4"})
        self.assertEqual(self.leverage_bodies(), [{"instId": "BTC-USDT-SWAP", "lever": "4", "mgnMode": "isolated"}])
        self.assertEqual(self.lever("BTC-USDT-SWAP", "isolated"), {"net": "4"})

    def test_cross_margin_in_long_short_mode_sets_the_contract(self):
        self.fake.set_position_mode("long_short_mode")
        self.data("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "15"})
        self.assertEqual(self.leverage_bodies(), [{"instId": "BTC-USDT-SWAP", "lever": "15", "mgnMode": "cross"}])
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"long": "15", "short": "15"})

    def test_leverage_above_the_maximum_answers_okx_code_and_message(self):
        error = self.error("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "150"})
        self.assertIn("OKX 59102", error)
        self.assertIn("Leverage exceeds the maximum leverage", error)
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "10"})

    def test_leverage_that_is_not_a_positive_number_is_refused_before_okx(self):
        for value in ("0", "-5", "ten"):
            error = self.error("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": value})
            self.assertIn("marginLevel", error)
        self.assertEqual(self.leverage_bodies(), [])

    def test_leverage_of_a_spot_symbol_is_an_error_without_calling_okx(self):
        self.assertIn("spot", self.error("SetMarginLevel", {"symbol": "BTC_USDT", "marginLevel": "5"}))
        self.assertEqual(self.leverage_bodies(), [])

    def test_leverage_param_on_trade_sets_it_once(self):
        for _ in range(3):
            self.market("BTC_USDT.swap", "buy", "1", leverage="5")
        self.assertEqual(self.leverage_bodies(), [{"instId": "BTC-USDT-SWAP", "lever": "5", "mgnMode": "cross"}])
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "5"})
        self.assertEqual([o["lever"] for o in self.fake.orders()], ["5", "5", "5"])
        self.assertEqual(self.data("positions", {"symbol": "BTC_USDT.swap"})[0]["margin_level"], "5")

    def test_leverage_param_on_trade_accepts_every_spelling(self):
        for name, lever in (("marginLevel", "6"), ("margin_level", "8"), ("leverage", "9")):
            self.place(symbol="ETH_USDT.swap", type="buy", price="2000", amount="1", **{name: lever})
            self.assertEqual(self.lever("ETH-USDT-SWAP"), {"net": lever}, name)
        self.assertEqual([o["lever"] for o in self.fake.orders()], ["9", "8", "6"])      # newest first

    def test_trade_leverage_going_back_to_an_earlier_value_is_set_again(self):
        for lever in ("5", "10", "5"):
            self.market("BTC_USDT.swap", "buy", "1", leverage=lever)
            self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": lever})
        self.assertEqual(self.fake.orders()[0]["lever"], "5")

    def test_trade_leverage_after_set_margin_level_is_applied(self):
        self.market("BTC_USDT.swap", "buy", "1", leverage="5")
        self.data("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": "20"})
        self.market("BTC_USDT.swap", "buy", "1", leverage="5")
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "5"})

    def test_refused_trade_leverage_places_no_order(self):
        error = self.error("trade", {"symbol": "BTC_USDT.swap", "type": "buy", "price": "-1", "amount": "1",
                                     "leverage": "500"})
        self.assertIn("OKX 59102", error)
        self.assertEqual(self.okx_calls("/api/v5/trade/order"), [])


class FundingTest(FuturesTestCase):
    """fundings (GetFundings): funding rates of perpetual swaps."""

    def test_funding_of_one_swap(self):
        funding_time = (self.fake.now_ms() // 3600000 + 1) * 3600000
        self.fake.set_funding("BTC-USDT-SWAP", "0.000251", funding_time, funding_time + 8 * 3600000)
        fundings = self.data("fundings", {"symbol": "BTC_USDT.swap"})
        self.assertEqual(fundings, [{"symbol": "BTC_USDT.swap", "rate": "0.000251", "time": funding_time,
                                     "interval": 8 * 3600000, "next_time": funding_time + 8 * 3600000}])
        self.assertEqual(self.okx_calls("/api/v5/public/funding-rate")[-1]["query"], "instId=BTC-USDT-SWAP")

    def test_funding_of_every_swap(self):
        fundings = {row["symbol"]: row for row in self.data("GetFundings")}
        self.assertEqual(set(fundings), SWAP_SYMBOLS)
        self.assertEqual((fundings["BTC_USD.swap"]["rate"], fundings["ETH_USDT.swap"]["rate"]), ("-0.00002", "0.00008"))
        self.assertEqual(self.okx_calls("/api/v5/public/funding-rate")[-1]["query"], "instId=ANY")

    def test_interval_follows_the_funding_times(self):
        funding_time = (self.fake.now_ms() // 3600000 + 1) * 3600000
        self.fake.set_funding("BTC-USD-SWAP", "0.0003", funding_time, funding_time + 4 * 3600000)
        funding = self.data("GetFundings", {"symbol": "BTC_USD", "contract_type": "swap"})[0]
        self.assertEqual((funding["symbol"], funding["rate"], funding["interval"], funding["next_time"]),
                         ("BTC_USD.swap", "0.0003", 4 * 3600000, funding_time + 4 * 3600000))

    def test_funding_of_spot_or_delivery_futures_is_an_error(self):
        self.assertIn("BTC_USDT", self.error("fundings", {"symbol": "BTC_USDT"}))
        self.assertIn("BTC_USD.quarter", self.error("fundings", {"symbol": "BTC_USD.quarter"}))
        self.assertEqual(self.okx_calls("/api/v5/public/funding-rate"), [])


class SwapLifecycleTest(FuturesTestCase):
    """A swap strategy's whole life through the plugin: leverage, open long, position, close, open short,
    funding, cancel a resting order; once for each position mode."""

    def live_a_swap_life(self):
        symbol = "BTC_USDT.swap"
        self.assertIs(self.data("SetMarginLevel", {"symbol": symbol, "marginLevel": "20"}), True)

        long_id = self.market(symbol, "buy", "4")
        self.assertEqual(self.data("order", {"id": long_id})["status"], "filled")
        long = self.data("GetPosition", {"symbol": symbol})
        self.assertEqual([(p["type"], p["amount"], p["margin_level"], p["price"]) for p in long],
                         [(0, "4", "20", "43010.6")])

        self.fake.set_price("BTC-USDT-SWAP", "43100.5", "43100.6")
        self.assertEqual(self.data("positions", {"symbol": symbol})[0]["profit"], self.fake.positions()[0]["upl"])
        close_id = self.place(symbol=symbol, type="sell", direction="closebuy", price="-1", amount="4")
        self.assertEqual(self.data("order", {"id": close_id})["offset"], "close")
        self.assertEqual(self.data("positions", {"symbol": symbol}), [])

        self.market(symbol, "sell", "2")
        short = self.data("GetPositions", {"symbol": symbol})
        self.assertEqual([(p["type"], p["amount"], p["margin_level"]) for p in short], [(1, "2", "20")])

        funding = self.data("GetFundings", {"symbol": symbol})
        self.assertEqual([(f["symbol"], f["rate"]) for f in funding], [(symbol, "0.0001")])

        resting = self.place(symbol=symbol, type="buy", price="40000", amount="1")
        self.assertEqual([o["id"] for o in self.data("orders", {"symbol": symbol})], [resting])
        self.assertIs(self.data("cancel", {"id": resting}), True)
        self.assertEqual(self.data("orders", {"symbol": symbol}), [])
        self.assertEqual(self.data("order", {"id": resting})["status"], "canceled")

        self.assertEqual([(p["type"], p["amount"]) for p in self.data("positions")], [(1, "2")])
        self.assertEqual(len(self.okx_calls("/api/v5/account/config")), 1)
        return self.order_bodies()

    def test_whole_life_in_net_mode(self):
        bodies = self.live_a_swap_life()
        self.assertEqual([(b["side"], b.get("reduceOnly", False)) for b in bodies],
                         [("buy", False), ("sell", True), ("sell", False), ("buy", False)])
        self.assertTrue(all("posSide" not in b for b in bodies))
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "20"})
        self.assertEqual(self.fake.positions()[0]["pos"], "-2")

    def test_whole_life_in_long_short_mode(self):
        self.fake.set_position_mode("long_short_mode")
        bodies = self.live_a_swap_life()
        self.assertEqual([(b["side"], b["posSide"]) for b in bodies],
                         [("buy", "long"), ("sell", "long"), ("sell", "short"), ("buy", "long")])
        self.assertTrue(all("reduceOnly" not in b for b in bodies))
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"long": "20", "short": "20"})
        self.assertEqual([(r["posSide"], r["pos"]) for r in self.fake.positions()], [("short", "2")])


FUTURES_TESTS = (FuturesMarketDataTest, PositionTest, FuturesOrderTest, LeverageTest, FundingTest, SwapLifecycleTest)


# ---- FMZ parity: ModifyOrder, condition orders, options ----
# PROTOCOL.md §4a and the README's "modifyorder", "Condition orders", "Options", "The older io form" and
# "The exchange.IO passthrough", through the plugin over HTTP, on virtual time.

PARITY_OCO = {"ConditionType": 0, "TpTriggerPrice": "45000", "TpOrderPrice": "-1",    # BTC-USDT last: 43000.1
              "SlTriggerPrice": "41000", "SlOrderPrice": "40900"}
PARITY_TP = {"ConditionType": 1, "TpTriggerPrice": "45000", "TpOrderPrice": "-1"}
NO_LEGS = {"TpTriggerPrice": 0, "TpOrderPrice": 0, "SlTriggerPrice": 0, "SlOrderPrice": 0}   # FMZ's typed languages


class ParityTestCase(FuturesTestCase):
    """FuturesTestCase with helpers for condition orders (OKX's algo orders), amendments and options."""

    def algo_posts(self):
        return [r for r in self.okx_calls("/api/v5/trade/order-algo") if r["method"] == "POST"]

    def algo_bodies(self):
        return [json.loads(r["body"]) for r in self.algo_posts()]

    def trade_requests(self):
        """Every request the fake received for a /api/v5/trade/ endpoint."""
        return [r for r in self.fake.requests if r["path"].startswith("/api/v5/trade/")]

    def condition_order(self, condition, symbol="BTC_USDT", type="sell", amount="0.01", **params):
        """A condition order placed through the plugin; its docker id."""
        params.update(symbol=symbol, type=type, amount=amount, condition=condition)
        return self.data("createconditionorder", params)["id"]

    def algo(self, docker_id):
        """The fake's row of a condition order, by its docker id INSTID,ALGOID."""
        inst_id, _, algo_id = docker_id.partition(",")
        rows = [row for row in self.fake.algo_orders() if row["algoId"] == algo_id]
        self.assertEqual([row["instId"] for row in rows], [inst_id], docker_id)
        return rows[0]

    def set_algo(self, docker_id, **fields):
        """Change a stored algo order as OKX would (pause it, say), which no request of the fake does."""
        with self.fake._lock:
            self.fake._algos(self.fake.accounts[KEY])[docker_id.partition(",")[2]].update(fields)

    def store_algos(self, count, ord_type, state="live", inst_id="BTC-USDT"):
        """`count` algo orders stored straight into the fake's account (as another program would place
        them, without a request), in `state`; their docker ids, oldest first."""
        if ord_type == "trigger":
            body = {"ordType": "trigger", "side": "buy", "triggerPx": "30", "orderPx": "-1"}
        else:
            body = {"ordType": ord_type, "side": "sell", "slTriggerPx": "30", "slOrdPx": "-1"}
            if ord_type == "oco":
                body.update(tpTriggerPx="90000", tpOrdPx="-1")
        body.update(instId=inst_id, tdMode="cash", sz="1")
        with self.fake._lock:
            account = self.fake.accounts[KEY]
            algos = [self.fake._new_algo(account, dict(body)) for _ in range(count)]
            for algo in algos:
                algo["state"] = state
        return ["%s,%s" % (inst_id, algo["algoId"]) for algo in algos]

    def envelope(self, **body):
        """One docker call with fields of the body's top level set by the test (the older io form)."""
        body.setdefault("access_key", KEY)
        body.setdefault("secret_key", SECRET_FIELD)
        body.setdefault("nonce", 1)
        status, answer = self.docker.send(json.dumps(body).encode("utf-8"))
        self.assertEqual(status, 200, answer)
        return answer


class ConditionRequestTest(ParityTestCase):
    """What createconditionorder, modifyconditionorder, cancelconditionorder and conditionorder send to
    OKX: only the legs that are set, the contract's posSide or reduceOnly, exact decimals, algoClOrdId from
    the nonce, tgtCcy for a spot buy with a market leg, and cancel-algos' array body."""

    def test_each_condition_type_is_its_ord_type_with_only_the_legs_that_are_set(self):
        nonce = 1796186655497236900
        base = {"instId": "BTC-USDT", "sz": "0.01", "tdMode": "cash"}
        cases = [
            ("sell", PARITY_OCO, {"ordType": "oco", "tpTriggerPx": "45000", "tpOrdPx": "-1", "slTriggerPx": "41000",
                                  "slOrdPx": "40900"}),
            ("sell", dict(NO_LEGS, ConditionType=1, TpTriggerPrice="45000", TpOrderPrice="-1"),
             {"ordType": "conditional", "tpTriggerPx": "45000", "tpOrdPx": "-1"}),
            ("sell", {"ConditionType": 2, "SlTriggerPrice": "41000", "SlOrderPrice": "40900", "TpTriggerPrice": "0",
                      "TpOrderPrice": ""}, {"ordType": "conditional", "slTriggerPx": "41000", "slOrdPx": "40900"}),
            ("buy", dict(NO_LEGS, ConditionType=3, TpTriggerPrice="42000", TpOrderPrice="41990"),
             {"ordType": "trigger", "triggerPx": "42000", "orderPx": "41990"}),
            ("buy", {"ConditionType": 3, "SlTriggerPrice": "44000", "SlOrderPrice": "44010"},
             {"ordType": "trigger", "triggerPx": "44000", "orderPx": "44010"}),
        ]
        ids = []
        for offset, (side, condition, legs) in enumerate(cases):
            answer = self.docker.call("createconditionorder", {"symbol": "BTC_USDT", "type": side, "amount": "0.01",
                                                               "condition": condition}, nonce=nonce + offset)
            self.assertEqual(set(answer), {"data", "raw"}, answer)
            ids.append(answer["data"]["id"])
        client_ids = ["fmz%d" % (nonce + offset) for offset in range(4)] + ["fmzs" + str(nonce + 4)[-28:]]
        self.assertEqual(self.algo_bodies(), [dict(base, algoClOrdId=client_id, side=side, **legs)
                                              for client_id, (side, _, legs) in zip(client_ids, cases)])
        self.assertEqual(ids, ["BTC-USDT," + row["algoId"] for row in reversed(self.fake.algo_orders())])
        self.assertEqual([self.algo(docker_id)["algoClOrdId"] for docker_id in ids], client_ids)

    def test_decimals_reach_okx_as_the_text_received(self):
        condition = ('{"ConditionType": 0, "TpTriggerPrice": "45000.10", "TpOrderPrice": 4.50001E+4, '
                     '"SlTriggerPrice": 41000.5, "SlOrderPrice": -1}')
        self.condition_order(condition, amount="0.0100")
        body = ('{"access_key": "%s", "secret_key": "%s", "nonce": 8, "method": "createconditionorder", '
                '"params": {"symbol": "BTC_USDT", "type": "sell", "amount": 1E-2, "condition": %s}}'
                % (KEY, SECRET_FIELD, json.dumps(condition)))
        status, answer = self.docker.send(body.encode("utf-8"))
        self.assertEqual(status, 200)
        self.assertIn("data", answer, answer)
        first, second = [request["body"] for request in self.algo_posts()]
        for text in ('"tpTriggerPx":"45000.10"', '"tpOrdPx":"45000.1"', '"slTriggerPx":"41000.5"', '"slOrdPx":"-1"'):
            self.assertIn(text, first)
            self.assertIn(text, second)
        self.assertIn('"sz":"0.0100"', first)
        self.assertIn('"sz":"0.01"', second)

    def test_contracts_carry_pos_side_in_long_short_mode(self):
        self.fake.set_position_mode("long_short_mode")
        buy_stop = {"ConditionType": 2, "SlTriggerPrice": "44000", "SlOrderPrice": "-1"}     # swap last 43010.5
        sell_stop = {"ConditionType": 2, "SlTriggerPrice": "42000", "SlOrderPrice": "-1"}
        for type, condition, direction in (("buy", buy_stop, None), ("sell", sell_stop, None),
                                           ("closebuy", sell_stop, None), ("sell", sell_stop, "closebuy"),
                                           ("closesell", buy_stop, None), ("buy", buy_stop, "closesell")):
            params = {"direction": direction} if direction else {}
            self.condition_order(condition, symbol="BTC_USDT.swap", type=type, amount="2", **params)
        bodies = self.algo_bodies()
        self.assertEqual([(b["side"], b["posSide"], b["tdMode"], b["sz"]) for b in bodies],
                         [("buy", "long", "cross", "2"), ("sell", "short", "cross", "2"),
                          ("sell", "long", "cross", "2"), ("sell", "long", "cross", "2"),
                          ("buy", "short", "cross", "2"), ("buy", "short", "cross", "2")])
        self.assertTrue(all("reduceOnly" not in b and "tgtCcy" not in b for b in bodies), bodies)
        self.assertEqual([row["posSide"] for row in reversed(self.fake.algo_orders())],
                         ["long", "short", "long", "long", "short", "short"])

    def test_closing_in_net_mode_is_reduce_only(self):
        buy_stop = {"ConditionType": 2, "SlTriggerPrice": "44000", "SlOrderPrice": "-1"}
        sell_stop = {"ConditionType": 2, "SlTriggerPrice": "42000", "SlOrderPrice": "-1"}
        for type, condition in (("buy", buy_stop), ("closebuy", sell_stop), ("closesell", buy_stop),
                                ("sell", sell_stop)):
            self.condition_order(condition, symbol="BTC_USDT.swap", type=type, amount="1")
        bodies = self.algo_bodies()
        self.assertEqual([(b["side"], b.get("reduceOnly")) for b in bodies],
                         [("buy", None), ("sell", True), ("buy", True), ("sell", None)])
        self.assertTrue(all("posSide" not in b for b in bodies), bodies)
        self.assertEqual([row["reduceOnly"] for row in reversed(self.fake.algo_orders())],
                         ["false", "true", "true", "false"])

    def test_a_spot_buy_with_a_market_leg_counts_its_amount_in_the_base_currency(self):
        self.condition_order({"ConditionType": 2, "SlTriggerPrice": "44000", "SlOrderPrice": "-1"}, type="buy")
        self.condition_order({"ConditionType": 0, "TpTriggerPrice": "42000", "TpOrderPrice": "41990",
                              "SlTriggerPrice": "44000", "SlOrderPrice": "-1"}, type="buy")
        self.condition_order({"ConditionType": 2, "SlTriggerPrice": "44000", "SlOrderPrice": "44010"}, type="buy")
        self.condition_order(PARITY_OCO)                                          # a sell: base already
        self.assertEqual([b.get("tgtCcy") for b in self.algo_bodies()], ["base_ccy", "base_ccy", None, None])
        self.fake.set_price("BTC-USDT", "44000", "44000.1")                       # the stops buy
        bought = [o for o in self.fake.orders() if o["side"] == "buy"]
        self.assertEqual(sorted((o["ordType"], o["accFillSz"]) for o in bought),
                         [("limit", "0.01"), ("market", "0.01"), ("market", "0.01")])

    def test_a_generic_spot_buy_at_market_is_placed_without_tgt_ccy(self):
        answer = self.docker.call("createconditionorder", {"symbol": "BTC_USDT", "type": "buy", "amount": "0.01",
                                                           "condition": {"ConditionType": 3, "TpTriggerPrice": "44000",
                                                                         "TpOrderPrice": "-1"}})
        self.assertIn("data", answer, answer)
        self.assertNotIn("tgtCcy", self.algo_bodies()[0])

    def test_modifyconditionorder_sends_only_the_legs_it_sets(self):
        oco = self.condition_order(PARITY_OCO)
        algo_id = oco.partition(",")[2]
        self.fake.clear_requests()
        change = dict(NO_LEGS, ConditionType=0, SlTriggerPrice=40500, SlOrderPrice=-1)
        answer = self.docker.call("modifyconditionorder", {"id": oco, "amount": "-1", "condition": change})
        self.assertEqual(answer["data"], {"id": oco})
        self.assertEqual(answer["raw"][0]["sCode"], "0")
        self.assertEqual([(r["method"], r["path"], r["query"]) for r in self.trade_requests()],
                         [("GET", "/api/v5/trade/order-algo", "algoId=" + algo_id),
                          ("POST", "/api/v5/trade/amend-algos", "")])
        amend = self.okx_calls("/api/v5/trade/amend-algos")
        self.assertEqual(json.loads(amend[-1]["body"]),
                         {"instId": "BTC-USDT", "algoId": algo_id, "newSlTriggerPx": "40500", "newSlOrdPx": "-1"})
        self.assertEqual(self.data("modifyconditionorder", {"id": oco, "amount": "0.02"}), {"id": oco})
        self.assertEqual(json.loads(self.okx_calls("/api/v5/trade/amend-algos")[-1]["body"]),
                         {"instId": "BTC-USDT", "algoId": algo_id, "newSz": "0.02"})
        self.assertEqual(len(self.okx_calls("/api/v5/trade/order-algo")), 1)      # an amount needs no read
        shown = self.data("conditionorder", {"id": oco})
        self.assertEqual((shown["amount"], shown["condition"]),
                         ("0.02", {"ConditionType": "0", "TpTriggerPrice": "45000", "TpOrderPrice": "-1",
                                   "SlTriggerPrice": "40500", "SlOrderPrice": "-1"}))

        generic = self.condition_order({"ConditionType": 3, "TpTriggerPrice": "42000", "TpOrderPrice": "41990"},
                                       type="buy")
        self.data("modifyconditionorder", {"id": generic, "condition": {"conditiontype": 3, "tptriggerprice": "42100",
                                                                        "tporderprice": "42090"}})
        self.assertEqual(json.loads(self.okx_calls("/api/v5/trade/amend-algos")[-1]["body"]),
                         {"instId": "BTC-USDT", "algoId": generic.partition(",")[2], "newTriggerPx": "42100",
                          "newOrdPx": "42090"})
        self.assertEqual((self.algo(generic)["triggerPx"], self.algo(generic)["ordPx"]), ("42100", "42090"))
        amends = len(self.okx_calls("/api/v5/trade/amend-algos"))
        two_legs = {"ConditionType": 3, "TpTriggerPrice": "1", "TpOrderPrice": "1", "SlTriggerPrice": "2",
                    "SlOrderPrice": "2"}
        self.assertEqual(self.error("modifyconditionorder", {"id": generic, "condition": two_legs}),
                         "condition: a generic condition has one leg, got two")
        self.assertEqual(self.error("modifyconditionorder", {"id": generic, "amount": "-1"}),
                         "modifyconditionorder changes nothing: amount is -1 (keep) and no condition is set")
        self.assertEqual(len(self.okx_calls("/api/v5/trade/amend-algos")), amends)

    def test_cancelconditionorder_sends_an_array_and_answers_true(self):
        docker_id = self.condition_order(PARITY_TP)
        answer = self.docker.call("cancelconditionorder", {"id": docker_id})
        self.assertIs(answer["data"], True)
        self.assertEqual(answer["raw"][0]["algoId"], docker_id.partition(",")[2])
        cancels = self.okx_calls("/api/v5/trade/cancel-algos")
        self.assertEqual([r["body"] for r in cancels],
                         ['[{"instId":"BTC-USDT","algoId":"%s"}]' % docker_id.partition(",")[2]])
        self.assertEqual(self.algo(docker_id)["state"], "canceled")
        self.assertEqual(self.data("conditionorder", {"id": docker_id})["status"], "canceled")

    def test_conditionorder_reads_by_algo_id_and_checks_the_instrument(self):
        docker_id = self.condition_order(PARITY_TP)
        self.fake.clear_requests()
        self.assertEqual(self.data("conditionorder", {"id": docker_id})["id"], docker_id)
        self.assertEqual([(r["method"], r["query"]) for r in self.trade_requests()],
                         [("GET", "algoId=" + docker_id.partition(",")[2])])
        wrong = "ETH-USDT," + docker_id.partition(",")[2]
        self.assertIn("OKX 51603: Order does not exist.", self.error("conditionorder", {"id": wrong}))


class ConditionInputTest(ParityTestCase):
    """The condition object: an object or its JSON text, FMZ's names in any letter case; a malformed one
    gets a clear error before anything reaches OKX."""

    def test_an_object_or_its_json_text_in_any_letter_case(self):
        text = json.dumps(PARITY_OCO)
        forms = [PARITY_OCO, text, {name.lower(): value for name, value in PARITY_OCO.items()},
                 {name.upper(): value for name, value in PARITY_OCO.items()}, json.dumps({"conditionType": "0",
                 "tpTriggerPrice": 45000, "tpOrderPrice": -1, "slTriggerPrice": 41000, "slOrderPrice": 40900}),
                 dict(PARITY_OCO, ConditionType="0")]
        for form in forms:
            self.condition_order(form)
        bodies = self.algo_bodies()
        self.assertEqual(len(bodies), len(forms))
        for body in bodies:
            self.assertEqual({name: body[name]
                              for name in ("ordType", "tpTriggerPx", "tpOrdPx", "slTriggerPx", "slOrdPx")},
                             {"ordType": "oco", "tpTriggerPx": "45000", "tpOrdPx": "-1", "slTriggerPx": "41000",
                              "slOrdPx": "40900"})

    def test_a_malformed_condition_gets_a_clear_error_and_never_reaches_okx(self):
        cases = [
            (None, "params.condition is required"),
            ({"TpTriggerPrice": "45000", "TpOrderPrice": "-1"},
             "condition.ConditionType is required: 0 OCO, 1 take-profit, 2 stop-loss, 3 generic"),
            (dict(PARITY_OCO, ConditionType=5), "condition.ConditionType must be at most 3, got 5"),
            (dict(PARITY_OCO, ConditionType="x"), "condition.ConditionType must be a whole number, got 'x'"),
            (dict(PARITY_TP, ConditionType=0),
             "condition: an OCO condition needs both a take-profit and a stop-loss leg"),
            (dict(PARITY_OCO, ConditionType=1), "condition: a take-profit condition needs the take-profit leg only"),
            (dict(PARITY_TP, ConditionType=2), "condition: a stop-loss condition needs the stop-loss leg only"),
            ({"ConditionType": 1, "TpTriggerPrice": "45000"},
             "condition: the take-profit leg needs both TpTriggerPrice and TpOrderPrice (-1: market)"),
            ({"ConditionType": 2, "SlOrderPrice": "-1", "SlTriggerPrice": 0},
             "condition: the stop-loss leg needs both SlTriggerPrice and SlOrderPrice (-1: market)"),
            (dict(PARITY_OCO, ConditionType=3), "condition: a generic condition needs one leg (TpTriggerPrice/"
                                                "TpOrderPrice or SlTriggerPrice/SlOrderPrice), got 2"),
            (dict(NO_LEGS, ConditionType=3), "condition: a generic condition needs one leg (TpTriggerPrice/"
                                             "TpOrderPrice or SlTriggerPrice/SlOrderPrice), got 0"),
            (dict(PARITY_TP, TpOrderPrice="-2"), "condition.TpOrderPrice must be greater than 0, got -2"),
            (dict(PARITY_TP, TpTriggerPrice="-1"), "condition.TpTriggerPrice must be greater than 0, got -1"),
            (dict(PARITY_TP, TpTriggerPrice="abc"), "condition.TpTriggerPrice must be a decimal number, got 'abc'"),
            ("{not json", "condition must be an object or its JSON text, got '{not json'"),
            ([1, 2], 'condition must be an object like {"ConditionType": 0, ...}, got [1, 2]'),
        ]
        self.fake.clear_requests()
        for condition, text in cases:
            params = {"symbol": "BTC_USDT.swap", "type": "sell", "amount": "1"}
            if condition is not None:
                params["condition"] = condition
            with self.subTest(condition=condition):
                self.assertEqual(self.error("createconditionorder", params), text)
        self.assertEqual(self.fake.requests, [])


class ConditionAnswerTest(ParityTestCase):
    """The condition order shape (the order shape plus condition, every field as text), FMZ statuses, an
    OCO that fired, and the lists: every page of both algo groups, history oldest first with since/limit."""

    def test_the_answer_is_the_order_shape_plus_the_condition_as_text(self):
        oco = self.condition_order(dict(PARITY_OCO, TpTriggerPrice=45000, SlOrderPrice=40900))
        self.assertEqual(oco, "BTC-USDT," + self.fake.algo_orders()[0]["algoId"])
        answer = self.docker.call("conditionorder", {"id": oco})
        self.assertEqual(answer["data"], {
            "id": oco, "symbol": "BTC_USDT", "amount": "0.01", "price": "40900", "deal_amount": "0", "avg_price": "0",
            "type": "sell", "status": "pending",
            "condition": {"ConditionType": "0", "TpTriggerPrice": "45000", "TpOrderPrice": "-1",
                          "SlTriggerPrice": "41000", "SlOrderPrice": "40900"}})
        self.assertEqual((answer["raw"]["algoId"], answer["raw"]["ordType"]), (oco.partition(",")[2], "oco"))
        shapes = [(PARITY_TP, "sell", "-1", ("1", "45000", "-1", "0", "0")),
                  ({"ConditionType": 2, "SlTriggerPrice": "41000", "SlOrderPrice": "40990"}, "sell", "40990",
                   ("2", "0", "0", "41000", "40990")),
                  ({"ConditionType": 3, "TpTriggerPrice": "42000", "TpOrderPrice": "41990"}, "buy", "41990",
                   ("3", "42000", "41990", "0", "0")),
                  ({"ConditionType": 3, "SlTriggerPrice": "42000", "SlOrderPrice": "-1"}, "sell", "-1",
                   ("3", "0", "0", "42000", "-1"))]
        for condition, side, price, fields in shapes:
            shown = self.data("conditionorder", {"id": self.condition_order(condition, type=side)})
            self.assertEqual((shown["price"], tuple(shown["condition"][name] for name in plugin.CONDITION_FIELDS)),
                             (price, fields), condition)
        swap = self.condition_order({"ConditionType": 2, "SlTriggerPrice": "42000", "SlOrderPrice": "-1"},
                                    symbol="BTC_USDT.swap", type="closebuy", amount="2")
        shown = self.data("GetConditionOrder", {"id": swap})
        self.assertEqual((shown["symbol"], shown["offset"], shown["type"], shown["amount"]),
                         ("BTC_USDT.swap", "close", "sell", "2"))
        self.assertNotIn("condition", self.data("order", {"id": self.place()}))     # plain orders have none

    def test_statuses_map_to_pending_filled_and_canceled(self):
        docker_id = self.condition_order(PARITY_TP)
        for state, status in (("live", "pending"), ("pause", "pending"), ("partially_effective", "pending"),
                              ("effective", "filled"), ("canceled", "canceled"), ("order_failed", "canceled"),
                              ("partially_failed", "canceled")):
            self.set_algo(docker_id, state=state)
            self.assertEqual(self.data("conditionorder", {"id": docker_id})["status"], status, state)

    def test_an_oco_that_triggers_its_take_profit_is_filled_with_its_deal(self):
        oco = self.condition_order({"ConditionType": 0, "TpTriggerPrice": "44000", "TpOrderPrice": "-1",
                                    "SlTriggerPrice": "42000", "SlOrderPrice": "-1"})
        self.fake.set_price("BTC-USDT", "43999.9", "44000")
        self.assertEqual(self.data("conditionorder", {"id": oco})["status"], "pending")
        self.fake.set_price("BTC-USDT", "44000.5", "44000.6")                 # across the take-profit
        shown = self.data("conditionorder", {"id": oco})
        self.assertEqual({name: shown[name] for name in ("status", "deal_amount", "avg_price", "price", "amount")},
                         {"status": "filled", "deal_amount": "0.01", "avg_price": "44000.5", "price": "-1",
                          "amount": "0.01"})
        self.assertEqual(shown["condition"]["TpTriggerPrice"], "44000")
        child, = self.fake.orders()
        self.assertEqual((child["side"], child["state"], child["avgPx"], child["algoId"]),
                         ("sell", "filled", "44000.5", oco.partition(",")[2]))
        self.assertEqual(self.data("conditionorders", {"symbol": "BTC_USDT"}), [])
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"symbol": "BTC_USDT"})], [oco])

    def test_conditionorders_covers_every_page_of_both_groups_newest_first(self):
        conditional = self.store_algos(120, "conditional")
        self.clock.advance(1)
        trigger = self.store_algos(110, "trigger")
        self.clock.advance(1)
        oco = self.store_algos(5, "oco") + self.store_algos(1, "oco", "pause")
        self.clock.advance(1)
        other = self.store_algos(1, "conditional", inst_id="ETH-USDT")
        self.store_algos(3, "conditional", state="canceled")
        self.fake.clear_requests()
        listed = [o["id"] for o in self.data("GetConditionOrders")]
        self.assertEqual(listed, list(reversed(conditional + trigger + oco + other)))
        queries = [urllib.parse.parse_qs(r["query"]) for r in self.okx_calls("/api/v5/trade/orders-algo-pending")]
        self.assertEqual([(q["ordType"][0], q.get("after", [""])[0]) for q in queries],
                         [("conditional,oco", ""), ("conditional,oco", conditional[27].partition(",")[2]),
                          ("trigger", ""), ("trigger", trigger[10].partition(",")[2])])
        self.fake.clear_requests()
        btc = [o["id"] for o in self.data("conditionorders", {"symbol": "BTC_USDT"})]
        self.assertEqual(btc, list(reversed(conditional + trigger + oco)))
        query = urllib.parse.parse_qs(self.okx_calls("/api/v5/trade/orders-algo-pending")[0]["query"])
        self.assertEqual((query["instType"], query["instId"]), (["SPOT"], ["BTC-USDT"]))

    def test_conditionorders_is_newest_first_within_one_millisecond(self):
        oco = self.condition_order(PARITY_OCO)
        generic = self.condition_order({"ConditionType": 3, "TpTriggerPrice": "42000", "TpOrderPrice": "41990"},
                                       type="buy")
        self.assertEqual([o["id"] for o in self.data("conditionorders")], [generic, oco])

    def test_historyconditionorders_is_oldest_first_and_honours_since_and_limit(self):
        fired = self.condition_order({"ConditionType": 0, "TpTriggerPrice": "44000", "TpOrderPrice": "-1",
                                      "SlTriggerPrice": "42000", "SlOrderPrice": "-1"})
        self.clock.advance(1)
        canceled = self.condition_order({"ConditionType": 1, "TpTriggerPrice": "46000", "TpOrderPrice": "-1"})
        self.assertIs(self.data("cancelconditionorder", {"id": canceled}), True)
        self.clock.advance(1)
        failed = self.condition_order(dict(PARITY_TP, TpTriggerPrice="44000"), amount="1")     # holds 0.5 BTC
        self.clock.advance(1)
        self.condition_order(dict(PARITY_TP, TpTriggerPrice="47000"))                          # still pending
        self.fake.set_price("BTC-USDT", "44000.5", "44000.6")
        self.assertEqual((self.algo(fired)["state"], self.algo(failed)["state"]), ("effective", "order_failed"))
        history = self.data("historyconditionorders", {"symbol": "BTC_USDT"})
        self.assertEqual([(o["id"], o["status"], o["deal_amount"]) for o in history],
                         [(fired, "filled", "0.01"), (canceled, "canceled", "0"), (failed, "canceled", "0")])
        since = int(self.algo(canceled)["cTime"])
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"since": since})], [canceled, failed])
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"since": str(since), "limit": "1"})],
                         [canceled])
        self.assertEqual([o["id"] for o in self.data("GetHistoryConditionOrders", {"limit": 2})], [canceled, failed])
        self.assertEqual(self.data("historyconditionorders", {"symbol": "ETH_USDT"}), [])
        states = {urllib.parse.parse_qs(r["query"])["state"][0]
                  for r in self.okx_calls("/api/v5/trade/orders-algo-history")}
        self.assertEqual(states, {"effective", "canceled", "order_failed"})

    def test_historyconditionorders_pages_back_to_since(self):
        old = self.store_algos(150, "conditional", state="canceled")
        self.clock.advance(1)
        new = self.store_algos(130, "conditional", state="canceled")
        since = int(self.algo(new[0])["cTime"])
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"since": since, "limit": 1000})], new)
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"limit": 1000})], old + new)

    def test_historyconditionorders_limit_takes_the_newest_of_both_groups(self):
        self.store_algos(150, "conditional", state="canceled")
        self.clock.advance(1)
        newer = self.store_algos(150, "trigger", state="canceled")
        self.assertEqual([o["id"] for o in self.data("historyconditionorders", {"limit": 150})], newer)


class LostConditionOrderTest(ParityTestCase):
    """A createconditionorder whose answer is lost is found by its algoClOrdId, never placed twice; a
    repeated nonce answers the same id; one OKX never processed is said not to be placed."""

    def test_an_answer_lost_after_okx_placed_it_is_recovered_by_algo_client_id(self):
        self.fake.fault("/api/v5/trade/order-algo", "reset_after_process")
        params = {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01", "condition": PARITY_OCO}
        first = self.docker.call("createconditionorder", params, nonce=1101)
        algo, = self.fake.algo_orders()
        self.assertEqual(first.get("data"), {"id": "BTC-USDT," + algo["algoId"]}, first)
        self.assertEqual(algo["algoClOrdId"], "fmz1101")
        lookups = [r for r in self.okx_calls("/api/v5/trade/order-algo") if r["method"] == "GET"]
        self.assertEqual([urllib.parse.parse_qs(r["query"]) for r in lookups], [{"algoClOrdId": ["fmz1101"]}])
        again = self.docker.call("createconditionorder", params, nonce=1101)
        self.assertEqual(again.get("data"), first["data"])
        self.assertEqual((len(self.algo_posts()), len(self.fake.algo_orders())), (1, 1))

    def test_an_answer_replaced_by_okx_timeout_is_recovered(self):
        relay = self.relay()
        relay.answer("POST", "/api/v5/trade/order-algo", {"code": "50004", "msg": "Endpoint request timeout. ",
                                                          "data": []}, status=400, process=True)
        docker = Docker(self.start_plugin(api_base=relay.base_url).server_address[1])
        self.addCleanup(docker.close)
        answer = docker.call("trade", {"symbol": "BTC_USDT.swap", "type": "closebuy", "price": "-1", "amount": "1",
                                       "condition": {"ConditionType": 2, "SlTriggerPrice": "42000",
                                                     "SlOrderPrice": "-1"}}, nonce=1201)
        algo, = self.fake.algo_orders()
        self.assertEqual(answer.get("data"), {"id": "BTC-USDT-SWAP," + algo["algoId"]}, answer)
        self.assertEqual([(method, path) for method, path, _ in relay.seen if "algo" in path],
                         [("POST", "/api/v5/trade/order-algo"), ("GET", "/api/v5/trade/order-algo")])

    def test_another_plugin_with_the_same_nonce_gets_51065_and_answers_the_same_id(self):
        params = {"symbol": "BTC_USDT", "type": "buy", "amount": "0.01",
                  "condition": {"ConditionType": 3, "SlTriggerPrice": "44000", "SlOrderPrice": "44010"}}
        first = self.docker.call("createconditionorder", params, nonce=1796186655497236999)
        docker = Docker(self.start_plugin().server_address[1])        # a restarted plugin: no memory of it
        self.addCleanup(docker.close)
        second = docker.call("createconditionorder", params, nonce=1796186655497236999)
        self.assertEqual(second.get("data"), first["data"], second)
        self.assertEqual((len(self.algo_posts()), len(self.fake.algo_orders())), (2, 1))
        self.assertEqual(self.fake.algo_orders()[0]["algoClOrdId"], "fmzs" + "1796186655497236999"[-28:])

    def test_a_condition_order_okx_never_got_stays_unknown_and_is_never_sent_again(self):
        # OKX has no expTime for algo orders: one OKX has not got may still arrive, so the plugin never says
        # "not placed" for it, and a repeat of its nonce looks for it again instead of placing a second one.
        self.fake.fault("/api/v5/trade/order-algo", "reset")
        params = {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01", "condition": PARITY_TP}
        for _ in range(2):
            error = self.docker.call("createconditionorder", params, nonce=1301).get("error", "")
            self.assertIn("the condition order's outcome is unknown", error)
            self.assertIn("OKX has no condition order with algoClOrdId fmz1301, but OKX has no expTime for it", error)
            self.assertIn("check the condition orders (GetConditionOrders) before placing it again", error)
        self.assertEqual(self.fake.algo_orders(), [])
        self.assertEqual(len(self.algo_posts()), 1)


class ConditionCodeTest(ParityTestCase):
    """OKX's refusals of condition orders reach the strategy with OKX's code and text."""

    def test_okx_codes_surface_with_their_text(self):
        self.assertIn("OKX 51298: Trigger orders are not available in the net mode of Expiry Futures and Perpetual "
                      "Futures", self.error("createconditionorder", {
                          "symbol": "BTC_USDT.swap", "type": "buy", "amount": "1",
                          "condition": {"ConditionType": 3, "TpTriggerPrice": "44000", "TpOrderPrice": "-1"}}))
        for side, leg, price, code in (("buy", "Tp", "44000", "51277"), ("buy", "Sl", "42000", "51278"),
                                       ("sell", "Tp", "42000", "51279"), ("sell", "Sl", "44000", "51280")):
            condition = {"ConditionType": 1 if leg == "Tp" else 2, leg + "TriggerPrice": price,
                         leg + "OrderPrice": "-1"}
            text = self.error("createconditionorder", {"symbol": "BTC_USDT", "type": side, "amount": "0.01",
                                                       "condition": condition})
            self.assertIn("OKX %s: %s" % (code, WRONG_SIDE[(side, leg.lower())][1]), text)
        docker_id = self.condition_order(PARITY_TP)
        self.data("cancelconditionorder", {"id": docker_id})
        self.assertIn("OKX 51400: " + ALGO_CANCEL_GONE[1], self.error("cancelconditionorder", {"id": docker_id}))
        self.assertIn("OKX 51503: " + ALGO_AMEND_GONE[1],
                      self.error("modifyconditionorder", {"id": docker_id, "amount": "0.02"}))
        self.assertEqual(self.fake.algo_orders()[0]["sz"], "0.01")
        taken = dict(SPOT_SELL_OCO, algoClOrdId=self.fake.algo_orders()[0]["algoClOrdId"])
        self.assertIn("OKX 51065: algoClOrdId already exists.",
                      self.error("__api_/api/v5/trade/order-algo", taken, headers={"Http-Method": "POST"}))
        self.assertEqual(len(self.fake.algo_orders()), 1)


class ProtectedSwapLifeTest(ParityTestCase):
    """A swap strategy's protected life: open a position, attach an OCO, move its stop with
    modifyconditionorder, the stop fires, the position is flat; once for each position mode."""

    def live_a_protected_life(self):
        symbol = "BTC_USDT.swap"
        self.market(symbol, "buy", "2")
        self.assertEqual([(p["type"], p["amount"]) for p in self.data("positions", {"symbol": symbol})], [(0, "2")])
        oco = self.condition_order({"ConditionType": 0, "TpTriggerPrice": "44000", "TpOrderPrice": "-1",
                                    "SlTriggerPrice": "41000", "SlOrderPrice": "-1"},
                                   symbol=symbol, type="sell", direction="closebuy", amount="2")
        self.assertEqual(self.data("conditionorders", {"symbol": symbol})[0]["offset"], "close")
        moved = {"ConditionType": 0, "SlTriggerPrice": "42500", "SlOrderPrice": "-1"}
        self.assertEqual(self.data("modifyconditionorder", {"id": oco, "amount": "-1", "condition": moved}),
                         {"id": oco})
        self.fake.set_price("BTC-USDT-SWAP", "42600", "42600.1")               # above the moved stop
        self.assertEqual([p["amount"] for p in self.data("positions", {"symbol": symbol})], ["2"])
        self.fake.set_price("BTC-USDT-SWAP", "42499.9", "42500")               # the stop fires
        shown = self.data("conditionorder", {"id": oco})
        self.assertEqual((shown["status"], shown["deal_amount"], shown["avg_price"], shown["price"]),
                         ("filled", "2", "42499.9", "-1"))
        self.assertEqual(shown["condition"]["SlTriggerPrice"], "42500")
        self.assertEqual(self.data("positions", {"symbol": symbol}), [])
        self.assertEqual(self.fake.positions(), [])
        self.assertEqual(self.data("conditionorders"), [])
        return self.algo_bodies()[0], json.loads(self.okx_calls("/api/v5/trade/amend-algos")[0]["body"])

    def test_in_net_mode(self):
        placed, amended = self.live_a_protected_life()
        self.assertEqual((placed["side"], placed.get("reduceOnly"), placed.get("posSide")), ("sell", True, None))
        self.assertEqual(set(amended), {"instId", "algoId", "newSlTriggerPx", "newSlOrdPx"})

    def test_in_long_short_mode(self):
        self.fake.set_position_mode("long_short_mode")
        placed, amended = self.live_a_protected_life()
        self.assertEqual((placed["side"], placed.get("reduceOnly"), placed.get("posSide")), ("sell", None, "long"))
        self.assertEqual(set(amended), {"instId", "algoId", "newSlTriggerPx", "newSlOrdPx"})


class ModifyOrderTest(ParityTestCase):
    """modifyorder over REST: -1 keeps price or amount, the order read back shows the amendment (OKX's
    "accepted" then a failure is an error), a finished order is OKX's 51503; spot and swap."""

    def amend_bodies(self):
        return [json.loads(r["body"]) for r in self.okx_calls("/api/v5/trade/amend-order")]

    def test_minus_one_keeps_the_price_or_the_amount(self):
        docker_id = self.place(price="30000", amount="0.01")
        ord_id = docker_id.partition(",")[2]
        answer = self.docker.call("ModifyOrder", {"id": docker_id, "price": "30000.5", "amount": "-1"}, nonce=2101)
        self.assertEqual(answer["data"], {"id": docker_id})
        self.assertEqual(answer["raw"]["data"][0]["sCode"], "0")
        self.assertEqual(self.data("modify_order", {"id": docker_id, "amount": "0.02"}, nonce=2102), {"id": docker_id})
        self.assertEqual(self.amend_bodies(), [
            {"instId": "BTC-USDT", "ordId": ord_id, "reqId": "fmz2101", "newPx": "30000.5"},
            {"instId": "BTC-USDT", "ordId": ord_id, "reqId": "fmz2102", "newSz": "0.02"}])
        self.assertRegex(self.okx_calls("/api/v5/trade/amend-order")[0]["headers"].get("expTime", ""), r"^\d{13}$")
        shown = self.data("order", {"id": docker_id})
        self.assertEqual((shown["price"], shown["amount"], shown["status"]), ("30000.5", "0.02", "pending"))
        self.assertEqual(self.error("modifyorder", {"id": docker_id, "price": "-1", "amount": -1}),
                         "modifyorder changes nothing: price and amount are both -1 (keep)")
        self.assertEqual(len(self.amend_bodies()), 2)

    def test_a_swap_order_is_amended_in_contracts(self):
        docker_id = self.place(symbol="BTC_USDT.swap", type="buy", price="40000", amount="1")
        self.assertEqual(self.data("modifyorder", {"id": docker_id, "price": "40100.10", "amount": "3"}),
                         {"id": docker_id})
        self.assertEqual(self.amend_bodies()[0]["newPx"], "40100.10")
        shown = self.data("order", {"id": docker_id})
        self.assertEqual((shown["symbol"], shown["price"], shown["amount"], shown["offset"]),
                         ("BTC_USDT.swap", "40100.1", "3", "open"))
        self.fake.fill(docker_id.partition(",")[2])
        self.assertIn("OKX 51503: Your order has already been filled or canceled.",
                      self.error("modifyorder", {"id": docker_id, "price": "40200"}))

    def test_accepted_then_failed_is_an_error_when_read_back(self):
        docker_id = self.place(price="30000", amount="0.01")
        self.fake.fail_next_amend = ("51008", "Order failed. Insufficient USDT balance in account.")
        started = self.clock.monotonic()
        self.fake.clear_requests()
        text = self.error("modifyorder", {"id": docker_id, "price": "30001"})
        self.assertEqual(text, "OKX accepted the amendment, but order %s still shows price 30000, amount 0.01, state "
                               "live: it was not applied, or not yet; read the order before acting on it" % docker_id)
        self.assertEqual(len(self.order_lookups()), plugin.AMEND_READ_BACKS)
        self.assertAlmostEqual(self.clock.monotonic() - started,
                               plugin.AMEND_READ_BACKS * plugin.AMEND_READ_BACK_WAIT, places=6)
        self.assertEqual(self.fake.amend_state(docker_id.partition(",")[2])["amendResult"], "-1")
        self.assertEqual(self.data("order", {"id": docker_id})["price"], "30000")

    def test_a_finished_order_is_okx_51503(self):
        canceled = self.place(price="30000", amount="0.01")
        self.data("cancel", {"id": canceled})
        self.assertIn("OKX 51503: Your order has already been filled or canceled.",
                      self.error("modifyorder", {"id": canceled, "price": "30001"}))
        self.assertEqual(len(self.order_lookups()), 0)                          # OKX's refusal: no read back

    def test_a_lost_answer_is_settled_by_reading_the_order(self):
        docker_id = self.place(price="30000", amount="0.01")
        self.fake.fault("/api/v5/trade/amend-order", "reset_after_process")
        answer = self.docker.call("modifyorder", {"id": docker_id, "price": "30002"})
        self.assertEqual(answer, {"data": {"id": docker_id}})
        self.assertEqual(self.data("order", {"id": docker_id})["price"], "30002")
        self.assertEqual(len(self.okx_calls("/api/v5/trade/amend-order")), 1)   # never sent twice


class ModifyOrderStreamTest(ParityTestCase):
    """modifyorder with the live account stream: the orders push's amendResult of its reqId decides,
    without reading the order back."""

    def setUp(self):
        super().setUp()
        plugin.LiveConnection._connect_times.clear()
        quick_stream_threads(self)
        self.okx_stream = FakeOKXStream(okx=self.fake, clock=self.clock).start()
        self.addCleanup(self.okx_stream.stop)
        server = self.start_plugin(stream=True, ws_base=self.okx_stream.url)
        self.docker = Docker(server.server_address[1])
        self.addCleanup(self.docker.close)
        self.data("accounts")                          # a read starts the key's account stream
        stream, = [s for s in server.exchanges["okx"].streams() if isinstance(s, plugin.AccountStream)]
        self.assertTrue(wait_for(lambda: stream.status()["synced"]["orders"], timeout=5), stream.status())

    def order_calls(self):
        """The order and amendment requests (the stream's own reads of open orders left out)."""
        return [(r["method"], r["path"]) for r in self.fake.requests
                if r["path"] in ("/api/v5/trade/order", "/api/v5/trade/amend-order")]

    def test_the_push_tells_success_and_failure(self):
        spot = self.place(price="30000", amount="0.01")
        swap = self.place(symbol="BTC_USDT.swap", type="sell", price="45000", amount="1")
        self.fake.clear_requests()
        self.assertEqual(self.data("modifyorder", {"id": spot, "price": "30001"}), {"id": spot})
        self.assertEqual(self.order_calls(), [("POST", "/api/v5/trade/amend-order")])    # no read back
        self.assertEqual(self.data("order", {"id": spot})["price"], "30001")
        for docker_id, price in ((spot, "30002"), (swap, "44000")):
            self.fake.fail_next_amend = ("51008", "Order failed. Insufficient USDT balance in account.")
            self.fake.clear_requests()
            self.assertEqual(self.error("modifyorder", {"id": docker_id, "price": price}),
                             "OKX 51008: Order failed. Insufficient USDT balance in account. (OKX accepted the "
                             "amendment of %s, then it failed: amendResult -1)" % docker_id)
            self.assertEqual(self.order_calls(), [("POST", "/api/v5/trade/amend-order")])
        self.assertEqual((self.fake.orders()[1]["px"], self.fake.orders()[0]["px"]), ("30001", "45000"))


class OptionTradingTest(ParityTestCase):
    """Options: markets and tickers of a family, a filled option order, its position, the order lists
    and cancel; option symbols BTC_USD.<instId> round-trip in every answer."""

    def test_from_markets_to_a_filled_option_order_and_its_position(self):
        markets = self.data("markets", {"symbol": "BTC_USD", "contract_type": "option"})
        self.assertEqual([r["query"] for r in self.okx_calls("/api/v5/public/instruments")][-1:],
                         ["instType=OPTION&instFamily=BTC-USD"])
        symbol = max(markets, key=lambda name: (name.split("-")[2], name))    # the latest expiry
        inst_id = symbol.partition(".")[2]
        self.assertRegex(symbol, r"^BTC_USD\.BTC-USD-\d{6}-\d+-[CP]$")
        self.assertEqual({name: markets[symbol][name] for name in ("symbol", "baseAsset", "quoteAsset", "ctValCcy")},
                         {"symbol": symbol, "baseAsset": "BTC", "quoteAsset": "USD", "ctValCcy": "BTC"})
        tickers = {t["symbol"]: t for t in self.data("tickers", {"symbol": "BTC_USD.option"})}
        self.assertEqual(set(tickers), set(markets))
        self.assertEqual(self.data("GetTicker", {"symbol": symbol})["sell"], tickers[symbol]["sell"])

        bought = self.place(symbol=symbol, type="buy", price=tickers[symbol]["sell"], amount="2")
        self.assertTrue(bought.startswith(inst_id + ","), bought)
        body = self.order_bodies()[-1]
        self.assertEqual({name: body[name] for name in ("instId", "tdMode", "side", "sz", "ordType", "px")},
                         {"instId": inst_id, "tdMode": "cross", "side": "buy", "sz": "2", "ordType": "limit",
                          "px": tickers[symbol]["sell"]})
        self.assertTrue("posSide" not in body and "reduceOnly" not in body, body)
        order = self.data("order", {"id": bought})
        self.assertEqual((order["symbol"], order["status"], order["deal_amount"], order["avg_price"]),
                         (symbol, "filled", "2", tickers[symbol]["sell"]))
        position, = self.data("positions")
        self.assertEqual((position["symbol"], position["contract_type"], position["amount"], position["type"]),
                         (symbol, inst_id, "2", 0))
        self.assertEqual(self.data("GetPositions", {"symbol": symbol}), [position])

        resting = self.place(symbol=symbol, type="sell", price="0.9", amount="1")
        self.assertEqual([o["id"] for o in self.data("orders")], [resting])
        self.assertEqual([(o["id"], o["symbol"]) for o in self.data("orders", {"symbol": symbol})], [(resting, symbol)])
        self.assertIs(self.data("cancel", {"id": resting}), True)
        history = self.data("historyorders")
        self.assertEqual([(o["id"], o["symbol"], o["status"]) for o in history],
                         [(resting, symbol, "canceled"), (bought, symbol, "filled")])
        self.assertIn("instType=OPTION", [r["query"] for r in self.okx_calls("/api/v5/trade/orders-history")][-1])
        self.assertEqual(self.error("SetMarginLevel", {"symbol": symbol, "marginLevel": "3"}),
                         "leverage applies to swaps and futures, not to the option %s" % symbol)

    def test_option_condition_orders_are_listed_by_their_symbol(self):
        symbol = max(self.data("markets", {"symbol": "BTC_USD.option"}))
        docker_id = self.condition_order({"ConditionType": 1, "TpTriggerPrice": "0.9", "TpOrderPrice": "0.9"},
                                         symbol=symbol, amount="1")
        self.assertEqual(self.data("conditionorder", {"id": docker_id})["symbol"], symbol)
        self.assertEqual([o["id"] for o in self.data("conditionorders", {"symbol": symbol})], [docker_id])


class OlderIoFormTest(ParityTestCase):
    """The older io form: code and args at the top level of the body or inside params; codes 0-3."""

    def test_each_code_at_the_top_level_or_inside_params(self):
        answer = self.envelope(method="io", code=0, args=["3"], params={"symbol": "BTC_USDT.swap"})
        self.assertIs(answer.get("data"), True, answer)
        self.assertEqual(self.leverage_bodies(), [{"instId": "BTC-USDT-SWAP", "lever": "3", "mgnMode": "cross"}])
        self.assertEqual(self.lever("BTC-USDT-SWAP"), {"net": "3"})
        requests = len(self.fake.requests)
        self.assertEqual(self.envelope(method="io", params={"code": 1, "args": ["closebuy"]}), {"data": True})
        self.assertEqual(self.envelope(method="IO", code="1", args="buy"), {"data": True})
        self.assertEqual(len(self.fake.requests), requests)                     # the direction goes with trade
        self.assertEqual(self.envelope(method="io", params={"code": 2, "args": ["quarter"], "symbol": "BTC_USD"}),
                         {"data": {"InstrumentID": self.futures_inst_id("BTC-USD", "quarter")}})
        self.assertEqual(self.envelope(method="io", code=2, args=["swap"], params={"symbol": "BTC_USDT.swap"}),
                         {"data": {"InstrumentID": "BTC-USDT-SWAP"}})
        self.market("BTC_USDT.swap", "buy", "2")
        positions = self.data("positions")
        self.assertEqual(self.envelope(method="io", params={"code": 3, "symbol": "BTC_USDT.swap"})["data"], positions)
        self.assertEqual(self.envelope(method="io", code=3)["data"], positions)
        self.assertEqual([(p["symbol"], p["margin_level"], p["amount"]) for p in positions],
                         [("BTC_USDT.swap", "3", "2")])

    def test_an_unknown_code_or_missing_args_is_an_error(self):
        known = "is not known: 0 SetMarginLevel, 1 SetDirection, 2 SetContractType, 3 GetPosition"
        for body, text in (
                ({"params": {"code": 7}}, "io code 7 " + known),
                ({"code": 4, "params": {"symbol": "BTC_USDT.swap"}}, "io code 4 " + known),
                ({"params": {}}, "params.code is required"),
                ({"code": 0, "params": {"symbol": "BTC_USDT.swap"}}, "io code 0 needs args[0]"),
                ({"code": 0, "args": ["3"]}, "io code 0 (SetMarginLevel) needs params.symbol"),
                ({"code": 1, "args": ["up"]}, "io code 1 (SetDirection): args[0] must be buy, sell, closebuy or "
                                              "closesell"),
                ({"code": 2, "args": ["swap"]}, "io code 2 (SetContractType) needs params.symbol, the pair"),
                ({"code": 2, "args": {"a": 1}}, 'args must be a list of the call\'s arguments, got {"a": 1}')):
            with self.subTest(body=body):
                self.assertEqual(self.envelope(method="io", **body), {"error": text})
        self.assertEqual(self.okx_calls("/api/v5/account/set-leverage"), [])


class UnknownMethodWarningTest(ParityTestCase):
    """An unknown method is logged once per name at warning level, with its parameter names, never values."""

    def test_logged_once_per_name_with_the_names_of_its_params_only(self):
        patcher = mock.patch.object(plugin, "_unknown_methods", set())
        patcher.start()
        self.addCleanup(patcher.stop)
        params = {"symbol": "BTC_USD", "passphrase": "hunter2secret", "strike": "strike100000"}
        for method in ("GetOptionChain", "getoptionchain", "GetOptionChain", "GetTrade", "GetOptionChain"):
            self.assertIn("unknown method %r" % method, self.error(method, params))
        warnings = [line for line in LOGS.lines if "which the plugin does not know" in line]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(" WARNING [GetOptionChain] the docker sent method 'GetOptionChain', which the plugin does not "
                      "know (its params: passphrase, strike, symbol); if FMZ names a known method so, please report it",
                      warnings[0])
        self.assertIn("the docker sent method 'GetTrade'", warnings[1])
        self.assertFalse([line for line in LOGS.lines if "hunter2secret" in line or "strike100000" in line
                          or "BTC_USD" in line])
        self.assertEqual(self.trade_requests(), [])


class ArrayPassthroughTest(ParityTestCase):
    """exchange.IO POST to OKX's array endpoints (cancel-algos, batch-orders): params that are an array,
    its JSON text, or a one-key object whose key is that text; signed and sent exactly as given."""

    def io_post(self, path, params):
        answer = self.data("__api_" + path, params, headers={"Http-Method": "POST"})
        self.assertEqual(answer["code"], "0", answer)          # the fake checks the signature of the exact body
        return answer["data"], self.okx_calls(path)[-1]["body"]

    def test_each_form_of_an_array_body(self):
        ids = [self.condition_order(PARITY_TP).partition(",")[2] for _ in range(3)]
        items = [{"instId": "BTC-USDT", "algoId": algo_id} for algo_id in ids]
        spaced = '[ {"instId": "BTC-USDT", "algoId": "%s"} ]' % ids[1]
        for params, sent in ((items[:1], json.dumps(items[:1], separators=(",", ":"))), (spaced, spaced),
                             ({json.dumps(items[2:]): ""}, json.dumps(items[2:]))):
            rows, body = self.io_post("/api/v5/trade/cancel-algos", params)
            self.assertEqual(body, sent)
            self.assertEqual([row["sCode"] for row in rows], ["0"])
        self.assertEqual({row["state"] for row in self.fake.algo_orders()}, {"canceled"})

        order = {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000.10",
                 "sz": "0.0100", "clOrdId": "io1"}
        batches = [[order], json.dumps([dict(order, clOrdId="io2"), dict(order, clOrdId="io3")]),
                   {json.dumps([dict(order, clOrdId="io4")]): ""}]
        sent_bodies = [json.dumps([order], separators=(",", ":")), batches[1], next(iter(batches[2]))]
        for batch, sent in zip(batches, sent_bodies):
            rows, body = self.io_post("/api/v5/trade/batch-orders", batch)
            self.assertEqual(body, sent)
            self.assertTrue(rows and all(row["sCode"] == "0" for row in rows), rows)
        self.assertEqual(sorted((o["clOrdId"], o["px"], o["sz"]) for o in self.fake.orders()),
                         [("io%d" % n, "30000.1", "0.01") for n in range(1, 5)])
        self.assertEqual(self.error("__api_/api/v5/trade/cancel-algos", items, headers={"Http-Method": "GET"}),
                         "exchange.IO GET sends its params as a query string: they must be an object, got list")
        self.assertEqual(self.error("__api_/api/v5/trade/cancel-algos", "[not json", headers={"Http-Method": "POST"}),
                         "exchange.IO POST params must be an object, an array or their JSON text, got '[not json'")


class TradeInputTest(ParityTestCase):
    """What a strategy may send that OKX would take otherwise or not at all: directions that contradict
    the type, a leverage on an option, an empty condition, decimals written "2900." or ".01", a comma
    after the passphrase; and a condition order's amendment that would change its kind."""

    def test_a_direction_that_contradicts_a_closing_type_is_refused(self):
        base = {"symbol": "BTC_USDT.swap", "price": "43000", "amount": "1"}
        for kind, direction in (("closebuy", "closesell"), ("closesell", "closebuy"), ("closebuy", "buy")):
            with self.subTest(type=kind, direction=direction):
                self.assertEqual(self.error("trade", dict(base, type=kind, direction=direction)),
                                 "direction %s contradicts type %s" % (direction, kind))
        self.assertEqual(self.order_posts(), [])

    def test_an_option_order_sends_no_leverage(self):
        symbol = max(self.data("markets", {"symbol": "BTC_USD", "contract_type": "option"}))
        self.place(symbol=symbol, type="sell", price="0.9", amount="1", marginLevel="3")
        self.assertEqual(self.okx_calls("/api/v5/account/set-leverage"), [])
        self.assertNotIn("lever", self.order_bodies()[-1])
        self.place(symbol="BTC_USDT.swap", type="buy", price="40000", amount="1", marginLevel="3")
        self.assertEqual(len(self.okx_calls("/api/v5/account/set-leverage")), 1)      # a swap's still is

    def test_an_empty_condition_is_a_plain_order(self):
        for n, condition in enumerate(("", " ", "{}", "[]", "null", {}, [], None)):
            with self.subTest(condition=condition):
                docker_id = self.place(price="30000", amount="0.01", condition=condition)
                self.assertEqual(self.data("order", {"id": docker_id})["status"], "pending")
        self.assertEqual((len(self.order_posts()), self.algo_posts()), (8, []))
        self.assertIn("ConditionType", self.error("trade", {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01",
                                                            "price": "-1", "condition": {"TpTriggerPrice": "1"}}))

    def test_decimals_with_a_bare_point_reach_okx_as_decimals(self):
        self.place(price="30000.", amount=".01")
        body = self.order_bodies()[-1]
        self.assertEqual((body["px"], body["sz"]), ("30000", "0.01"))
        self.assertEqual(self.error("trade", dict(ORDER, price=".")), "price must be a decimal number, got '.'")

    def test_a_comma_after_the_passphrase_is_ignored(self):
        for field in (SECRET_FIELD + ",", SECRET_FIELD + ", ", SECRET_FIELD + ",,"):
            with self.subTest(secret_key=field):
                answer = self.docker.call("accounts", secret_key=field)
                self.assertIn("data", answer, answer)
        passphrases = {r["headers"].get("OK-ACCESS-PASSPHRASE") for r in self.okx_calls("/api/v5/account/balance")}
        self.assertEqual(passphrases, {PASSPHRASE})

    def test_an_amendment_keeps_the_kind_of_condition_order(self):
        take_profit = self.condition_order(PARITY_TP)
        self.fake.clear_requests()
        stop_loss = {"ConditionType": 2, "SlTriggerPrice": "41000", "SlOrderPrice": "-1"}
        self.assertEqual(self.error("modifyconditionorder", {"id": take_profit, "condition": stop_loss}),
                         "condition order %s is a take-profit condition (ConditionType 1): an amendment cannot "
                         "make it a stop-loss one" % take_profit)
        both = dict(PARITY_TP, SlTriggerPrice="41000", SlOrderPrice="-1")
        self.assertEqual(self.error("modifyconditionorder", {"id": take_profit, "condition": both}),
                         "condition order %s is a take-profit condition: its amendment sets that leg only"
                         % take_profit)
        self.assertEqual(self.okx_calls("/api/v5/trade/amend-algos"), [])
        moved = dict(PARITY_TP, TpTriggerPrice="46000")
        self.assertEqual(self.data("modifyconditionorder", {"id": take_profit, "condition": moved}),
                         {"id": take_profit})
        self.assertEqual(self.algo(take_profit)["tpTriggerPx"], "46000")


class DockerInputInLogTest(ParityTestCase):
    """What the docker sends reaches a log line only printable and short: a method name or a param name
    with a line break cannot forge a line of its own."""

    def test_a_line_break_in_a_method_or_param_name_forges_no_log_line(self):
        forged = "fly\n2026-12-02 00:00:00,000 INFO [-] forged"
        LOGS.lines.clear()
        self.assertIn("unknown method", self.error(forged, {"a\rWARNING forged": 1, "amount": "1"}))
        self.assertIn("unknown method", self.error("ticker\x1b[2J", {"symbol": "BTC_USDT"}))
        self.assertTrue(LOGS.lines)
        for line in LOGS.lines:
            self.assertNotIn("\n", line)
            self.assertNotIn("\r", line)
            self.assertNotIn("\x1b", line)
        warned = [line for line in LOGS.lines if "which the plugin does not know" in line]
        self.assertEqual(len(warned), 2, LOGS.lines)
        self.assertIn("amount", warned[0])


class ParityMethodNameTest(ParityTestCase):
    """The parity methods' names: any letter case, _ and - ignored, Get for reads only (a Get spelling
    never acts); a trade or CreateOrder with a condition places a condition order, and so does a
    conditionorder with an amount."""

    def test_spellings_reach_the_methods(self):
        first = self.data("CreateConditionOrder", {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01",
                                                   "condition": PARITY_TP})["id"]
        second = self.data("create_condition_order", {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01",
                                                      "condition": PARITY_TP})["id"]
        newest_first = [second, first]
        for method in ("conditionorders", "GetConditionOrders", "get-condition-orders", "GET_CONDITION_ORDERS",
                       " getConditionOrders "):
            self.assertEqual([o["id"] for o in self.data(method)], newest_first, method)
        for method in ("conditionorder", "GetConditionOrder", "get_condition_order"):
            self.assertEqual(self.data(method, {"id": first})["id"], first, method)
        self.assertEqual(len(self.data("GetHistoryConditionOrders")), 0)
        for method in ("ModifyConditionOrder", "modify-condition-order"):
            self.assertEqual(self.data(method, {"id": first, "amount": "0.02"}), {"id": first})
        self.assertIs(self.data("CancelConditionOrder", {"id": first}), True)
        self.assertIs(self.data("cancel_condition_order", {"id": second}), True)
        order = self.place(price="30000")
        for n, method in enumerate(("modifyorder", "ModifyOrder", "modify-order", "MODIFY_ORDER")):
            self.assertEqual(self.data(method, {"id": order, "price": "2999%d" % n}), {"id": order})
        self.assertEqual(self.data("order", {"id": order})["price"], "29993")

    def test_a_get_spelling_never_acts(self):
        order = self.place(price="30000")
        docker_id = self.condition_order(PARITY_TP)
        self.fake.clear_requests()
        condition = {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01", "condition": PARITY_TP}
        for method, params in (("GetCreateConditionOrder", condition), ("GetTrade", dict(condition, price="-1")),
                               ("GetCreateOrder", dict(condition, price="-1")),
                               ("GetModifyOrder", {"id": order, "price": "1"}),
                               ("GetModifyConditionOrder", {"id": docker_id, "amount": "1"}),
                               ("GetCancelConditionOrder", {"id": docker_id}), ("GetIO", {"code": 0, "args": ["3"]})):
            self.assertIn("unknown method %r" % method, self.error(method, params))
        self.assertEqual(self.error("GetConditionOrder", condition), "params.id is required")
        self.assertEqual(self.trade_requests(), [])

    def test_a_trade_with_a_condition_places_a_condition_order(self):
        params = {"symbol": "BTC_USDT", "type": "buy", "price": "-1", "amount": "0.01",
                  "condition": {"ConditionType": 2, "SlTriggerPrice": "44000", "SlOrderPrice": "-1"}}
        ids = [self.data("trade", params)["id"], self.data("CreateOrder", dict(params, price="30000"))["id"],
               self.data("trade", dict(params, condition=json.dumps(params["condition"])))["id"],
               self.data("conditionorder", {key: value for key, value in params.items() if key != "price"})["id"]]
        self.assertEqual(ids, ["BTC-USDT," + row["algoId"] for row in reversed(self.fake.algo_orders())])
        self.assertEqual(self.order_posts(), [])
        self.assertEqual({(b["ordType"], b["sz"], b["side"]) for b in self.algo_bodies()},
                         {("conditional", "0.01", "buy")})
        for empty in ("", {}):
            self.data("trade", dict(params, condition=empty, price="30000"))       # no condition: a plain order
        self.assertEqual(len(self.order_posts()), 2)
        # An amount alone makes a conditionorder a createconditionorder (which also reads "Condition").
        self.assertEqual(self.error("conditionorder", {"symbol": "BTC_USDT", "type": "buy", "amount": "0.01"}),
                         "params.condition is required")
        by_amount = self.data("conditionorder", {"symbol": "BTC_USDT", "type": "sell", "amount": "0.01",
                                                 "Condition": PARITY_TP})["id"]
        self.assertEqual(by_amount, "BTC-USDT," + self.fake.algo_orders()[0]["algoId"])
        self.assertEqual(len(self.algo_posts()), 5)

    def test_a_trade_with_a_capitalised_condition_places_a_condition_order(self):
        answer = self.docker.call("trade", {"symbol": "BTC_USDT", "type": "sell", "price": "1", "amount": "0.01",
                                            "Condition": PARITY_TP})
        self.assertEqual(self.order_posts(), [])
        self.assertEqual(answer.get("data"), {"id": "BTC-USDT," + self.fake.algo_orders()[0]["algoId"]})


# ---- Hardening: helpers ----

PLUGIN_PATH = os.path.abspath(plugin.__file__)
ORDER = {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"}    # rests: below the ask


def request_bytes(body=b"", verb="POST", path="/OKX", headers=None, content_length=True):
    """One raw HTTP/1.1 request, for what http.client refuses to send (lying or missing Content-Length)."""
    lines = ["%s %s HTTP/1.1" % (verb, path), "Host: 127.0.0.1", "Content-Type: application/json"]
    if content_length is True:
        lines.append("Content-Length: %d" % len(body))
    elif content_length is not None:
        lines.append("Content-Length: %s" % content_length)
    lines += ["%s: %s" % item for item in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def docker_body(method, params=None, nonce=1, access_key=KEY, secret_key=SECRET_FIELD):
    return json.dumps({"access_key": access_key, "secret_key": secret_key, "nonce": nonce,
                       "method": method, "params": {} if params is None else params}).encode("utf-8")


class RawDocker:
    """A docker connection that sends raw bytes and reads raw answers (a misbehaving docker)."""

    def __init__(self, port, timeout=5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data):
        self.sock.sendall(data)
        return self

    def answer(self):
        """(HTTP status, JSON answer, whether the plugin said it closes the connection)."""
        response = http.client.HTTPResponse(self.sock, method="GET")   # GET: read a body even for HEAD
        response.begin()
        raw = response.read()
        return response.status, json.loads(raw.decode("utf-8")), response.will_close

    def closed_within(self, seconds):
        """True when the plugin closes the connection within `seconds` (anything it sends is discarded)."""
        deadline = time.monotonic() + seconds
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except socket.timeout:
                return False
            except OSError:       # reset
                return True

    def close(self):
        self.sock.close()


def free_port():
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _default_sigint():
    # A child inherits an ignored SIGINT (e.g. from a CI shell running jobs in the background); an
    # operator's Ctrl-C is never ignored, so give the plugin the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PluginProcess:
    """`python3 fmz_custom_protocol.py ARGS` in a subprocess, its stderr collected line by line."""

    def __init__(self, *args, env=None):
        self.process = subprocess.Popen([sys.executable, PLUGIN_PATH] + list(args), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        preexec_fn=_default_sigint, env=env)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in iter(self.process.stderr.readline, b""):
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def stderr(self):
        return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=10):
        """The first stderr line matching the regex `pattern`; None when none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.process.poll() is not None and not self._reader.is_alive()
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if ended or time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def port(self):
        line = self.wait_for(r"listening on http://")
        if line is None:
            raise AssertionError("the plugin did not start:\n" + self.stderr)
        return int(re.search(r"listening on http://\S+:(\d+)/OKX", line).group(1))

    def stop(self, signum=signal.SIGTERM, timeout=1.0):
        """Send `signum`; return (exit status or None if still running after `timeout`, seconds taken)."""
        started = time.monotonic()
        self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        elapsed = time.monotonic() - started
        self.kill()
        return status, elapsed

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._reader.join(5)
        self.process.stderr.close()


def run_plugin(*args, timeout=10):
    """Run the plugin to its end; (exit status or None when it was still running, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, PLUGIN_PATH] + list(args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        status = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        status = None
    return status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


class HardeningTestCase(PluginTestCase):
    """PluginTestCase with a short --timeout, and helpers for answers that must come quickly."""

    plugin_options = {"timeout": 1.5}

    def timed(self, method, params=None, docker=None, **fields):
        """(answer, seconds it took)."""
        started = time.monotonic()
        answer = (docker or self.docker).call(method, params, **fields)
        return answer, time.monotonic() - started

    def assert_still_serves(self, docker=None):
        """A normal request on a new connection is answered at once."""
        docker = docker or Docker(self.server.server_address[1])
        try:
            answer, elapsed = self.timed("ticker", {"symbol": "BTC_USDT"}, docker=docker)
        finally:
            docker.close()
        self.assertEqual(answer.get("data", {}).get("symbol"), "BTC_USDT", answer)
        self.assertLess(elapsed, 3.0)      # not stalled (a stall is the 20 s read timeout); a loaded CI may be slow

    def wait_for_threads(self, limit, timeout=5.0):
        """threading.active_count() once it is at most `limit` (or after `timeout`)."""
        deadline = time.monotonic() + timeout
        while threading.active_count() > limit and time.monotonic() < deadline:
            time.sleep(0.05)
        return threading.active_count()




# ---- Bad input from the docker ----

class BadInputTest(HardeningTestCase):
    """Whatever the docker sends, the plugin answers {"error"} saying what is wrong and keeps serving."""

    def raw(self, data, timeout=5):
        docker = RawDocker(self.server.server_address[1], timeout)
        self.addCleanup(docker.close)
        return docker.send(data)

    def raw_error(self, data):
        """The error text of a raw request's answer (HTTP 200, JSON {"error": text})."""
        status, answer, _ = self.raw(data).answer()
        self.assertEqual(status, 200, answer)
        self.assertEqual(list(answer), ["error"], answer)
        return answer["error"]

    def test_body_that_is_not_json_an_object_or_utf8_is_an_error(self):
        self.assertIn("not JSON", self.raw_error(request_bytes(b"{method: ticker")))
        self.assertIn("not JSON", self.raw_error(request_bytes(b"")))
        self.assertIn("not JSON", self.raw_error(request_bytes(b'{"method": NaN}')))
        for body, kind in ((b"[1, 2]", "list"), (b'"ticker"', "str"), (b"42", "int"), (b"null", "NoneType")):
            error = self.raw_error(request_bytes(body))
            self.assertIn("JSON object", error)
            self.assertIn(kind, error)
        error = self.raw_error(request_bytes(b'{"method": "ticker", "params": {"symbol": "BTC_\xff\xfe"}}'))
        self.assertIn("UTF-8", error)
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_envelope_fields_of_the_wrong_type_are_named(self):
        cases = [({"method": 5}, "method"), ({"params": {}}, "method"), ({"method": "  "}, "method"),
                 ({"method": "ticker", "params": [1]}, "params"), ({"method": "ticker", "params": "x"}, "params"),
                 ({"method": "accounts", "access_key": 123}, "access_key"),
                 ({"method": "accounts", "secret_key": ["s", "p"]}, "secret_key")]
        for envelope, field in cases:
            self.assertIn(field, self.raw_error(request_bytes(json.dumps(envelope).encode())), envelope)
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_mistyped_params_are_named_without_calling_okx(self):
        cases = [("depth", {"symbol": "BTC_USDT", "limit": "abc"}, "limit"),
                 ("depth", {"symbol": "BTC_USDT", "limit": [5]}, "limit"),
                 ("depth", {"symbol": "BTC_USDT", "limit": {"n": 5}}, "limit"),
                 ("depth", {"symbol": "BTC_USDT", "limit": 5.5}, "limit"),
                 ("depth", {"symbol": "BTC_USDT", "limit": True}, "limit"),
                 ("depth", {"symbol": "BTC_USDT", "limit": -3}, "limit"),
                 ("records", {"symbol": "BTC_USDT", "period": "hour"}, "period"),
                 ("historyorders", {"symbol": "BTC_USDT", "since": "yesterday"}, "since"),
                 ("ticker", {"symbol": 5}, "symbol"), ("ticker", {"symbol": ["BTC_USDT"]}, "symbol"),
                 ("ticker", {}, "symbol"), ("ticker", {"symbol": "USDT"}, "USDT"),
                 ("order", {"id": {"x": 1}, "symbol": "BTC_USDT"}, "id"), ("order", {}, "id")]
        for method, params, named in cases:
            self.assertIn(named, self.error(method, params), (method, params))
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_bad_amounts_and_prices_place_no_order(self):
        for name, value in (("amount", "abc"), ("amount", "-0.5"), ("amount", "0"), ("amount", 0),
                            ("amount", -1), ("amount", "1.2.3"), ("amount", "NaN"), ("amount", "Infinity"),
                            ("amount", [1]), ("amount", True), ("price", "abc"), ("price", "-2"),
                            ("price", {"px": 1}), ("type", 1), ("type", "short")):
            self.assertIn(name, self.error("trade", dict(ORDER, **{name: value})), (name, value))
        for missing in ("symbol", "type", "price", "amount"):
            params = dict(ORDER)
            del params[missing]
            self.assertIn(missing, self.error("trade", params))
        self.assertEqual(self.order_posts(), [])
        self.assertEqual(self.fake.orders(), [])
        self.place()                                     # a good order right after is placed, once
        self.assertEqual(len(self.fake.orders()), 1)

    def test_trade_without_a_usable_nonce_places_no_order(self):
        for nonce in ("abc", -1, 1.5, None, [1], True):
            body = docker_body("trade", ORDER, nonce=nonce)
            status, answer = self.docker.send(body)
            self.assertIn("nonce", answer.get("error", ""), (nonce, answer))
        self.assertEqual(self.order_posts(), [])
        self.assertEqual(self.fake.orders(), [])
        self.assert_still_serves()

    def test_numbers_with_huge_exponents_are_refused_at_once(self):
        # 1e300000 is valid JSON; turning it into an int must not take seconds of CPU (the GIL is held
        # meanwhile, so every robot would wait).
        body = ('{"access_key":"%s","secret_key":"%s","nonce":3,"method":"depth",'
                '"params":{"symbol":"BTC_USDT","limit":1e300000}}' % (KEY, SECRET_FIELD)).encode()
        started = time.monotonic()
        status, answer = self.docker.send(body)
        self.assertLess(time.monotonic() - started, 1.0)
        if "error" in answer:        # may also be capped at OKX's maximum
            self.assertIn("limit", answer["error"])
        self.assert_still_serves()

    def test_whole_numbers_with_thousands_of_digits_are_named_not_internal_errors(self):
        # Python refuses int() of more than 4300 digits (CVE-2020-10735 limit, also in 3.8.14+)
        for method, params, named in (("depth", {"symbol": "BTC_USDT", "limit": "1" * 5000}, "limit"),
                                      ("historyorders", {"symbol": "BTC_USDT", "since": "9" * 5000}, "since"),
                                      ("trade", ORDER, "nonce")):
            with self.subTest(param=named):
                nonce = "1" * 5000 if named == "nonce" else None
                answer = self.docker.call(method, params, nonce=nonce)
                if "error" in answer:    # a huge limit may also be capped at OKX's maximum
                    self.assertIn(named, answer["error"])
                    self.assertNotIn("internal error", answer["error"])
        self.assertEqual(self.order_posts(), [])
        self.assert_still_serves()

    def test_unknown_method_and_exchange_path_are_named(self):
        self.assertIn("'withdraw'", self.error("withdraw", {"amount": "1"}))
        for path in ("/Binance", "/", "/OKX/extra", "/%FF"):
            error = self.raw_error(request_bytes(docker_body("ticker", {"symbol": "BTC_USDT"}), path=path))
            self.assertIn("unknown exchange", error, path)
            self.assertIn("/OKX", error)
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_secret_key_without_passphrase_is_refused_for_every_signed_method(self):
        for method, params in (("accounts", {}), ("trade", ORDER), ("orders", {"symbol": "BTC_USDT"}),
                               ("cancel", {"id": "BTC-USDT,1", "symbol": "BTC_USDT"})):
            for secret_key in (SECRET, SECRET + ",", SECRET + ",,simulate", ""):
                error = self.error(method, params, secret_key=secret_key)
                self.assertIn("SECRET,PASSPHRASE", error, (method, secret_key))
                self.assertNotIn(SECRET, error)
        self.assertIn("access_key", self.error("accounts", access_key=""))
        signed = [r for r in self.fake.requests if "OK-ACCESS-SIGN" in r["headers"]]
        self.assertEqual(signed, [])
        self.assertEqual(self.fake.orders(), [])
        self.assert_still_serves()

    def test_every_verb_but_post_is_an_error(self):
        for verb in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            status, answer, closes = self.raw(request_bytes(docker_body("trade", ORDER), verb=verb)).answer()
            self.assertEqual(status, 200, verb)
            self.assertIn("only POST", answer["error"], verb)
        for verb in ("TRACE", "BREW"):
            status, answer, closes = self.raw(request_bytes(b"", verb=verb)).answer()
            self.assertEqual(list(answer), ["error"], verb)
            self.assertTrue(closes)
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_missing_or_unreadable_content_length_is_an_error_and_closes(self):
        body = docker_body("ticker", {"symbol": "BTC_USDT"})
        for content_length in (None, "abc", "-5", "1e3", "0x20", "", "\xb2"):
            with self.subTest(content_length=content_length):
                docker = self.raw(request_bytes(body, content_length=content_length))
                status, answer, closes = docker.answer()
                self.assertEqual(status, 200)
                self.assertIn("Content-Length", answer.get("error", ""))
                self.assertTrue(closes)
                self.assertTrue(docker.closed_within(1.0))
        status, answer, closes = self.raw(request_bytes(body, headers={"Transfer-Encoding": "chunked"},
                                                        content_length=None)).answer()
        self.assertIn("Content-Length", answer["error"])
        self.assertTrue(closes)
        self.assertEqual(self.fake.requests, [])
        self.assert_still_serves()

    def test_content_length_longer_than_the_body_is_an_error(self):
        body = docker_body("trade", ORDER)
        docker = self.raw(request_bytes(body, content_length=len(body) + 50))
        docker.sock.shutdown(socket.SHUT_WR)            # the docker sent all it will send
        status, answer, closes = docker.answer()
        self.assertIn("shorter than its Content-Length", answer["error"])
        self.assertTrue(closes)
        self.assertEqual(self.fake.orders(), [])
        self.assertEqual(self.order_posts(), [])
        self.assert_still_serves()

    def test_content_length_shorter_than_the_body_places_nothing(self):
        body = docker_body("trade", ORDER, nonce=77)
        docker = self.raw(request_bytes(body, content_length=len(body) - 10))
        status, answer, _ = docker.answer()
        self.assertIn("not JSON", answer["error"])
        self.assertEqual(self.fake.orders(), [])
        self.assert_still_serves()

    def test_body_over_one_mebibyte_is_refused_unread(self):
        docker = self.raw(request_bytes(b"", content_length=plugin.MAX_REQUEST_BYTES + 1) + b'{"method":')
        started = time.monotonic()
        status, answer, closes = docker.answer()
        self.assertLess(time.monotonic() - started, 1.0)          # not waiting for the rest of the body
        self.assertIn("larger than", answer["error"])
        self.assertIn(str(plugin.MAX_REQUEST_BYTES), answer["error"])
        self.assertTrue(closes)
        self.assertIn("larger than", self.raw_error(request_bytes(b"", content_length=10 ** 12)))
        # exactly the limit is still served
        body = docker_body("ticker", {"symbol": "BTC_USDT"})
        body += b" " * (plugin.MAX_REQUEST_BYTES - len(body))
        status, answer = self.docker.send(body)
        self.assertEqual(answer.get("data", {}).get("symbol"), "BTC_USDT", str(answer)[:200])
        self.assert_still_serves()

    def test_half_a_request_is_dropped_after_the_read_timeout_without_stalling_others(self):
        with mock.patch.object(plugin.DockerHandler, "timeout", 0.5):
            idle = self.raw(b"")                           # a connection that never sends anything
            in_headers = self.raw(b"POST /OKX HTTP/1.1\r\nContent-Le")
            body = docker_body("trade", ORDER, nonce=99)
            in_body = self.raw(request_bytes(body)[:-20])
            self.assert_still_serves()                  # while all three stall, other robots are served
            self.assertTrue(in_headers.closed_within(2.0))
            status, answer, closes = in_body.answer()
            self.assertIn("did not arrive", answer["error"])
            self.assertTrue(closes)
            self.assertTrue(in_body.closed_within(1.0))
            self.assertTrue(idle.closed_within(2.0))
        self.assertEqual(self.order_posts(), [])
        self.assertEqual(self.fake.orders(), [])
        self.assert_still_serves()

    def test_thousands_of_dropped_connections_leave_no_thread(self):
        port = self.server.server_address[1]
        threads_before = threading.active_count()
        body = docker_body("trade", ORDER, nonce=5)
        opened, started = 0, time.monotonic()
        while opened < 2000 and time.monotonic() - started < 4:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if opened % 3 == 1:
                sock.sendall(b"POST /OKX HTTP/1.1\r\nContent-Le")
            elif opened % 3 == 2:
                sock.sendall(request_bytes(body)[:-7])            # a trade cut short
            sock.close()
            opened += 1
        elapsed = time.monotonic() - started
        self.assert_still_serves()
        threads_after = self.wait_for_threads(threads_before + 2)
        self.assertEqual(opened, 2000, "only %d connections in %.1f s: connecting stalls" % (opened, elapsed))
        self.assertLessEqual(threads_after, threads_before + 2)
        self.assertEqual(self.fake.orders(), [])

    def test_connections_reset_by_the_docker_print_no_traceback(self):
        port = self.server.server_address[1]
        threads_before = threading.active_count()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for n in range(30):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if n % 2:
                    sock.sendall(b"POST /OKX HTTP/1.1\r\nContent-Le")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()                                        # with a TCP reset
                time.sleep(0.005)     # paced: the storm test above is about bursts, this one about resets
            self.assert_still_serves()
            self.wait_for_threads(threads_before + 2)
        printed = stderr.getvalue()
        self.assertEqual(printed.count("Traceback"), 0, printed[-700:])

    def test_bad_requests_leak_no_thread(self):
        self.docker.close()
        threads_before = threading.active_count()
        for _ in range(20):
            for data in (request_bytes(b"nope"), request_bytes(b"[]"), request_bytes(b"x", verb="GET"),
                         request_bytes(b"{}", content_length=None), request_bytes(b"", content_length=2 ** 21),
                         b"GARBAGE\r\n\r\n"):
                docker = RawDocker(self.server.server_address[1])
                docker.send(data)
                docker.sock.shutdown(socket.SHUT_WR)
                self.assertTrue(docker.closed_within(2.0))
                docker.close()
        self.assertLessEqual(self.wait_for_threads(threads_before + 1), threads_before + 1)
        self.assert_still_serves()


# ---- Memory bounds ----

class LoopbackPool:
    """Stands for the plugin's ConnectionPool in tests that make thousands of calls: each request is
    handed to a FakeOKX's dispatcher in the calling thread, without a socket; same answers, no I/O."""

    def __init__(self, fake, host):
        self.fake, self.host, self.opened = fake, host, 0

    def request(self, method, target, body, headers, deadline, retry_stale=True):
        status, answer = self.fake._dispatch(method, target, headers, body.decode("utf-8") if body else "",
                                             "127.0.0.1")
        return status, json.dumps(answer, separators=(",", ":")).encode("utf-8")

    def close(self):
        pass


def plugin_memory(all_frames=False):
    """Bytes now held by what the plugin's own lines allocated, while tracemalloc traces; with
    ``all_frames`` (and tracemalloc started with frames to look at) also what code the plugin called
    allocated, json.loads say."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, plugin.__file__,
                                                                             all_frames=all_frames)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


class MemoryBoundTest(PluginTestCase):
    """Weeks of robots, keys and symbols coming and going leave the plugin no bigger: every memory it
    keeps per key, instrument or order is bounded, and what cannot be bounded is refused at the door."""

    def setUp(self):
        super().setUp()
        level = plugin.log.level
        plugin.log.setLevel(logging.WARNING)        # thousands of debug lines would be the test's memory
        self.addCleanup(plugin.log.setLevel, level)

    @property
    def shared(self):
        return self.server.exchanges["okx"]

    def call(self, method, params, access_key=KEY, nonce=None):
        """One docker method run as DockerHandler runs it (without the HTTP around it); answer or error text."""
        protocol_class, _ = plugin.EXCHANGES["okx"]
        request = plugin.DockerRequest(access_key, SECRET_FIELD, nonce, None, self.clock.monotonic() + 5)
        try:
            return plugin.dispatch(protocol_class(request, self.shared), method, params)
        except plugin.ProtocolError as exc:
            return str(exc)

    def churn(self, round_number, nonces, instruments):
        """``instruments`` instruments nobody will ask about again, through every family of methods; 40 API
        keys OKX does not know; 60 orders placed; a leverage set; then every rate window empties."""
        for n in range(instruments):
            base = "M%d%04d" % (round_number, n)
            family = n % 4
            if family == 0:
                self.call("ticker", {"symbol": base + "_USDT"})                       # market data
            elif family == 1:
                self.call("order", {"id": base + "-USDT,1"})                          # a signed read
            elif family == 2:
                self.call("trade", {"symbol": base + "_USDT", "type": "buy", "price": "1", "amount": "1"},
                          nonce=next(nonces))                                          # refused by OKX
            else:
                self.call("__api_/api/v5/public/funding-rate", {"instId": base + "-USDT-SWAP"})
        for n in range(40):
            self.call("accounts", {}, access_key="churn-key-%d-%d" % (round_number, n))
        for _ in range(60):
            self.call("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "20000", "amount": "0.00001"},
                      nonce=next(nonces))
        self.call("SetMarginLevel", {"symbol": "BTC_USDT.swap", "marginLevel": str(2 + round_number)})
        self.fake.clear_requests()
        with self.fake._lock:
            self.fake.accounts[KEY]["orders"].clear()       # the fake's memory is not the plugin's
        self.clock.advance(3)

    def test_keys_and_instruments_that_come_and_go_leave_the_plugin_no_bigger(self):
        # 240 API keys and 5,000 instruments in six rounds: four to warm up, two measured (tracemalloc
        # is slow). The memories are made small here (their size is MEMORY_ENTRIES) so that the first
        # rounds fill them.
        client = self.shared.client
        client.pool = LoopbackPool(self.fake, client.pool.host)
        memories = {"orders": self.shared.orders._outcomes, "leverage": self.shared.leverage,
                    "caches": client._caches}
        for memory in memories.values():
            self.assertEqual(memory.size, plugin.MEMORY_ENTRIES)
            memory.size = 50
        parsed = {"keys": plugin.OKX._known_keys, "symbols": plugin._known_symbols}   # bounded too
        for memory in parsed.values():
            self.addCleanup(setattr, memory, "size", memory.size)
            memory.size = 50
        client.limiter.SWEEP_EVERY = 16
        self.fake.set_balance("USDT", "100000000")
        nonces, in_use = iter(range(1, 10 ** 6)), []
        for round_number in range(4):                    # warm-up: every memory at its size
            self.churn(round_number, nonces, 1000)
            in_use.append(client.limiter.in_use())
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.churn(4, nonces, 500)
        after_warm_up = plugin_memory()
        self.churn(5, nonces, 500)
        after_more = plugin_memory()
        in_use.append(client.limiter.in_use())
        self.assertLess(after_more - after_warm_up, 60000, (after_warm_up, after_more))
        self.assertLess(max(in_use), 300, in_use)              # of ~790 new ones a round
        for name, memory in list(memories.items()) + list(parsed.items()):
            self.assertLessEqual(len(memory), memory.size, name)
        self.assertEqual(len(memories["orders"]), 50)             # full: 360 orders went through it
        self.assertLessEqual(len(client.requests_sent), 65)

    def test_a_500_kb_inst_id_through_the_passthrough_is_not_kept(self):
        self.assertIn("data", self.docker.call("accounts"))         # the kept-alive connections are made
        self.assertIn("data", self.docker.call("ticker", {"symbol": "BTC_USDT"}))
        tracemalloc.start(64)
        self.addCleanup(tracemalloc.stop)
        before = plugin_memory(all_frames=True)
        answer = self.docker.call("__api_/api/v5/public/funding-rate", {"instId": "BTC" * 170000})
        self.assertIn("error", answer)
        self.assertIn("data", self.docker.call("ticker", {"symbol": "BTC_USDT"}))   # the first one is done
        self.assertLess(plugin_memory(all_frames=True) - before, 100000)

    def test_a_million_digit_nonce_is_refused_within_a_second(self):
        if hasattr(sys, "set_int_max_str_digits"):       # as a Python without that limit (before 3.8.14)
            limit = sys.get_int_max_str_digits()
            sys.set_int_max_str_digits(0)
            self.addCleanup(sys.set_int_max_str_digits, limit)
        for nonce, error in (("1" * 1000000, r"request body is not JSON \(.*digits"),
                             ('"%s"' % ("1" * 1000000), "nonce is out of range")):
            body = ('{"access_key":"%s","secret_key":"%s","nonce":%s,"method":"trade","params":%s}'
                    % (KEY, SECRET_FIELD, nonce, json.dumps(ORDER))).encode()
            started = time.monotonic()
            status, answer = self.docker.send(body)
            self.assertLess(time.monotonic() - started, 1.0)          # real time: the parse itself
            self.assertRegex(answer.get("error", ""), error)
        self.assertEqual(self.fake.requests, [])

    def test_json_nested_100000_deep_is_not_json_and_logs_no_traceback(self):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for body in ("[" * 100000 + "]" * 100000, '{"a":' * 100000 + "1" + "}" * 100000,
                         '{"method":"ticker","params":' + "[" * 100000 + "]" * 100000 + "}"):
                status, answer = self.docker.send(body.encode())
                self.assertIn("request body is not JSON", answer.get("error", ""), body[:10])
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertNotIn("Traceback", "\n".join(LOGS.lines))
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["symbol"], "BTC_USDT")

    def test_a_symbol_longer_than_okx_allows_is_refused_before_okx(self):
        long_symbol = "BTC_USDT." + "9" * plugin.OKX_MAX_INST_ID
        for method, params in (("ticker", {}), ("depth", {}), ("trades", {}), ("records", {"period": 1}),
                               ("trade", {"type": "buy", "price": "1", "amount": "1"}), ("orders", {}),
                               ("order", {"id": "1"}), ("historyorders", {}), ("cancel", {"id": "1"}),
                               ("positions", {}), ("SetMarginLevel", {"marginLevel": "5"}), ("fundings", {}),
                               ("markets", {}), ("tickers", {})):
            with self.subTest(method=method):
                self.assertIn("longer than any OKX instrument", self.error(method, dict(params, symbol=long_symbol)))
        error = self.error("ticker", {"symbol": "BTC_USDT", "contract_type": "w" * 100})
        self.assertIn("contract_type", error)
        self.assertEqual(self.fake.requests, [])

    def test_an_access_key_or_secret_longer_than_okx_gives_is_refused_before_okx(self):
        long_key = "k" * (plugin.MAX_KEY_CHARS + 1)
        for method, params in (("accounts", {}), ("trade", ORDER), ("__api_/api/v5/account/balance", {})):
            with self.subTest(method=method):
                self.assertIn("access_key is longer", self.error(method, params, access_key=long_key))
                self.assertIn("secret_key is longer", self.error(method, params, secret_key="s," + "p" * 300))
        self.assertEqual(self.fake.requests, [])

    def test_a_pushed_trade_with_a_huge_count_keeps_the_tape_small(self):
        plugin.LiveConnection._connect_times.clear()
        quick_stream_threads(self)
        okx = FakeOKXStream(clock=self.clock).start()
        self.addCleanup(okx.stop)
        market = plugin.MarketStream(okx.url, self.clock)
        self.addCleanup(market.close)
        self.assertIsNone(market.trades(BTC, 1))
        self.assertTrue(wait_for(lambda: market.stats()["subscriptions"] == 1))
        self.assertIsNone(market.trades(BTC, 1))             # live now: REST rows after this are a seed
        market.seed_trades(BTC, [])
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = plugin_memory()
        for count in ("999999", "9" * 18, "1" + "0" * 400):
            pushed = okx.add_trade(BTC, "43000", "5", count=count)
            self.assertTrue(wait_for(lambda: (market.trades(BTC, 1) or [{}])[0].get("tradeId") == pushed["tradeId"]),
                            count[:8])
        self.assertLess(plugin_memory() - before, 500000)
        self.assertEqual(len(market.trades(BTC, 3)), 3)


# ---- A relay in front of the fake: answers lost, held or scripted ----

class OKXRelay:
    """A TCP relay in front of a FakeOKX (the plugin's --api-base) that loses, holds or replaces answers
    as a network or OKX can, without any real time having to pass.

    Requests pass through unchanged (one upstream connection per plugin connection), except those that
    a rule, set beforehand, takes (the first request it matches, by method and path prefix):

    - ``hold_order(deliver_on_lookup=False)``: the next POST /api/v5/trade/order is held and the plugin's
      connection reset at once, as an order still travelling inside OKX when the connection broke. It
      reaches the fake when the test calls ``deliver()`` (after the plugin answered, say), or with
      ``deliver_on_lookup`` the moment the fake has answered the plugin's first lookup of it: that lookup
      finds nothing, and the order is executed before the plugin asks again. ``late_answer`` is the fake's
      answer to it, ``delivered`` is set then.
    - ``hold_answer()``: the next order reaches the fake at once, but its answer is held until
      ``release()``; then the plugin's connection is reset: an answer lost after a long wait.
    - ``answer(method, path, envelope, status=200, process=False, count=1)``: the next ``count`` matching
      requests get OKX's JSON ``envelope`` with HTTP ``status``; with ``process`` the fake carries each out
      first (an order really is placed) and its own answer is dropped.

    ``holding`` is set once a held order or answer is held. ``seen`` lists ``(method, path, body)`` of
    every request that reached the relay.
    """

    def __init__(self, fake):
        self.upstream = ("127.0.0.1", int(fake.base_url.rsplit(":", 1)[1]))
        self.late_answer = None
        self.delivered = threading.Event()
        self.holding = threading.Event()
        self.seen = []
        self._released = threading.Event()
        self._rules = []
        self._held = None
        self._deliver_on_lookup = False
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self._listener.getsockname()[1]

    def stop(self):
        self._released.set()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    # -- rules ------------------------------------------------------------------------------------------

    def hold_order(self, deliver_on_lookup=False):
        self._deliver_on_lookup = deliver_on_lookup
        self._add("POST", "/api/v5/trade/order", "hold", 1)

    def hold_answer(self):
        self._released.clear()
        self._add("POST", "/api/v5/trade/order", "hold_answer", 1)

    def answer(self, method, path, envelope, status=200, process=False, count=1):
        self._add(method, path, "answer", count, envelope=envelope, status=status, process=process)

    def clear(self):
        with self._lock:
            del self._rules[:]

    def _add(self, method, path, kind, count, **details):
        with self._lock:
            self._rules.append(dict(details, method=method, path=path, kind=kind, count=count))

    def _rule_for(self, method, path):
        with self._lock:
            for rule in self._rules:
                if rule["count"] > 0 and rule["method"] == method and path.startswith(rule["path"]):
                    rule["count"] -= 1
                    return rule
        return None

    # -- what the test does with held things -----------------------------------------------------------

    def deliver(self):
        """Send the held order to the fake now; its answer (parsed JSON)."""
        with self._lock:
            request, self._held = self._held, None
        assert request is not None, "no order is held"
        with socket.create_connection(self.upstream, timeout=10) as upstream:
            upstream.sendall(request)
            answer = self._read_message(upstream.makefile("rb"))
        self.late_answer = json.loads(answer.partition(b"\r\n\r\n")[2].decode("utf-8"))
        self.delivered.set()
        return self.late_answer

    def release(self):
        """Let a held answer go: the plugin's connection is reset instead of receiving it."""
        self._released.set()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_message(reader):
        """One HTTP message (head and Content-Length body) as bytes, or b"" at the end of the stream."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                return b""
            head += line
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        return head + (reader.read(int(length.group(1))) if length else b"")

    @staticmethod
    def _reset(client):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _serve(self, client):
        upstream = upstream_reader = None

        def forward(request):
            nonlocal upstream, upstream_reader
            if upstream is None:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream_reader = upstream.makefile("rb")
            upstream.sendall(request)
            return self._read_message(upstream_reader)
        try:
            reader = client.makefile("rb")
            while True:
                request = self._read_message(reader)
                if not request:
                    return
                method, target = request.split(b" ", 2)[:2]
                method, path = method.decode("latin-1"), target.decode("latin-1").partition("?")[0]
                with self._lock:
                    self.seen.append((method, path, request.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")))
                rule = self._rule_for(method, path)
                kind = rule["kind"] if rule else None
                if kind == "hold":
                    with self._lock:
                        self._held = request
                    self.holding.set()
                    return self._reset(client)
                if kind == "answer" and not rule["process"]:
                    answer = None
                else:
                    answer = forward(request)
                if kind == "hold_answer":             # carried out by the fake; its answer is lost later
                    self.holding.set()
                    self._released.wait(30)
                    return self._reset(client)
                if kind == "answer":
                    body = json.dumps(rule["envelope"]).encode("utf-8")
                    answer = ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                              % (rule["status"], HTTPStatus(rule["status"]).phrase, len(body))).encode() + body
                if self._deliver_on_lookup and self._held is not None and (method, path) == (
                        "GET", "/api/v5/trade/order"):
                    self.deliver()                    # the lookup found nothing; now the order executes
                client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


# ---- Faults on the OKX side ----

class OkxFaultTest(HardeningTestCase):
    """OKX unreachable, silent, resetting, answering HTML or garbage or 429: a clear error within --timeout,
    read-only calls retried once on a stale connection, and the plugin serving normally afterwards."""

    def assert_error_in_time(self, method, params, *fragments):
        answer, elapsed = self.timed(method, params)
        self.assertIn("error", answer, answer)
        for fragment in fragments:
            self.assertRegex(answer["error"], fragment)
        self.assertLess(elapsed, self.server.config.timeout + 0.5)
        return answer["error"]

    def close_idle_okx_connections(self):
        """The fake closes every kept-alive connection, as OKX does with idle ones; returns once the FIN
        has reached the plugin's side of each."""
        _drop_sockets(self.fake._lock, self.fake._sockets)
        pool = self.server.exchanges["okx"].client.pool
        self.assertTrue(wait_for(lambda: all(plugin._closed_by_peer(connection.sock)
                                             for connection, _ in list(pool._idle))))

    def test_closed_port_is_a_clear_error_at_once(self):
        port = free_port()
        server = self.start_plugin(api_base="http://127.0.0.1:%d" % port, timeout=1.5)
        docker = Docker(server.server_address[1])
        self.addCleanup(docker.close)
        for method, params in (("ticker", {"symbol": "BTC_USDT"}), ("accounts", {}), ("trade", ORDER)):
            answer, elapsed = self.timed(method, params, docker=docker)
            self.assertIn("cannot connect to 127.0.0.1:%d" % port, answer.get("error", ""), answer)
            self.assertLess(elapsed, 1.0)
        self.assert_still_serves()              # the other plugin, on the same process, is unaffected

    def test_silent_okx_is_a_clear_error_within_the_timeout_then_calls_work(self):
        # Each waits for a real socket timeout, so all at once: a server that accepts connections (the
        # kernel does) but never answers, over http and https; and OKX not answering one request.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        self.fake.fault("/api/v5/market/ticker", "timeout")
        bases = {"http": "http://127.0.0.1:%d" % silent.getsockname()[1],
                 "https": "https://127.0.0.1:%d" % silent.getsockname()[1], "okx": self.fake.base_url}
        answers = {}

        def robot(name):
            docker = Docker(self.start_plugin(api_base=bases[name], timeout=1.0).server_address[1])
            self.addCleanup(docker.close)
            answers[name] = self.timed("ticker", {"symbol": "BTC_USDT"}, docker=docker)
        robots = [threading.Thread(target=robot, args=(name,)) for name in bases]
        for thread in robots:
            thread.start()
        for thread in robots:
            thread.join()
        for name, (answer, elapsed) in sorted(answers.items()):
            self.assertIn("error", answer, name)
            self.assertRegex(answer["error"], "time", name)
            self.assertLess(elapsed, 1.5, name)
        self.assertIn("did not answer within", answers["okx"][0]["error"])
        self.assert_still_serves()
        self.assertIn("data", self.docker.call("accounts"))

    def test_reset_on_a_new_connection_is_a_clear_error(self):
        self.fake.fault("/api/v5/market/ticker", "reset")
        self.assert_error_in_time("ticker", {"symbol": "BTC_USDT"}, "closed before OKX answered")
        self.assert_still_serves()

    def test_read_only_call_is_retried_once_on_a_stale_connection(self):
        self.assertIn("data", self.docker.call("ticker", {"symbol": "BTC_USDT"}))
        self.fake.fault("/api/v5/market/ticker", "reset")        # the kept-alive connection breaks
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["symbol"], "BTC_USDT")
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 3)
        self.assertEqual(self.fake.connections, 2)
        self.fake.fault("/api/v5/market/ticker", "reset", count=2)  # but only once
        self.assert_error_in_time("ticker", {"symbol": "BTC_USDT"}, "closed before OKX answered")

    def test_connections_okx_closed_while_idle_are_not_reused(self):
        self.assertIn("data", self.docker.call("accounts"))
        self.close_idle_okx_connections()
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["symbol"], "BTC_USDT")
        self.close_idle_okx_connections()
        order_id = self.place()
        self.assertEqual([order_id], ["BTC-USDT," + order["ordId"] for order in self.fake.orders()])
        self.assertEqual(len(self.order_posts()), 1)
        self.assertEqual(self.order_lookups(), [])

    def test_http_5xx_and_bodies_that_are_not_json_are_clear_errors(self):
        for kind, fragments in (("http500", ("HTTP 500", "not OKX's JSON")), ("http502_empty", ("HTTP 502",)),
                                ("http503", ("OKX 50001",)), ("garbage", ("HTTP 200", "JSON"))):
            self.fake.fault("/api/v5/market/ticker", kind)
            error = self.assert_error_in_time("ticker", {"symbol": "BTC_USDT"}, *fragments)
            self.assertLess(len(error), 400)                  # a snippet of the body at most
            self.fake.fault("/api/v5/account/balance", kind)
            self.assert_error_in_time("accounts", {}, *fragments)
        self.assert_still_serves()
        self.assertIn("data", self.docker.call("accounts"))

    def test_rate_limit_answer_that_cannot_be_waited_for_is_a_clear_error(self):
        self.fake.fault("/api/v5/market/ticker", "ratelimit")
        self.assert_error_in_time("ticker", {"symbol": "BTC_USDT"}, "OKX 50011")
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 1)    # OKX is not hammered
        self.assertEqual(self.data("depth", {"symbol": "BTC_USDT", "limit": 5})["asks"][0][0], "43000.2")

    def test_order_refused_by_the_rate_limit_is_not_placed(self):
        self.fake.fault("/api/v5/trade/order", "ratelimit")
        self.assert_error_in_time("trade", ORDER, "OKX 50011")
        self.assertEqual(self.fake.orders(), [])
        self.assertEqual(len(self.order_posts()), 1)


# ---- Orders whose answer is lost ----

class LostOrderTest(HardeningTestCase):
    """An order is placed at most once: a lost answer is found by its clOrdId, an order that was not placed
    is said to be so, a repeated nonce answers the same order, and OKX never executes it late."""

    plugin_options = {"timeout": 1.0}     # a lost answer's socket timeout is real time: 0.6 s of it

    def trade(self, nonce, params=ORDER):
        answer, elapsed = self.timed("trade", params, nonce=nonce)
        self.assertLess(elapsed, self.server.config.timeout + 0.5)
        return answer

    def assert_one_order(self, answer):
        orders = self.fake.orders()
        self.assertEqual(len(orders), 1, orders)
        self.assertEqual(answer.get("data"), {"id": "BTC-USDT," + orders[0]["ordId"]}, answer)
        return orders[0]

    def test_answer_lost_after_the_order_was_placed_is_recovered(self):
        for nonce, kind in ((101, "timeout_after_process"), (102, "reset_after_process")):
            self.fake.fault("/api/v5/trade/order", kind)
            answer = self.trade(nonce)
            order = self.fake.orders()[0]
            self.assertEqual(order["clOrdId"], "fmz%d" % nonce)
            self.assertEqual(answer.get("data"), {"id": "BTC-USDT," + order["ordId"]}, answer)
            self.assertEqual(len(self.fake.orders()), nonce - 100)
        self.assertEqual(len(self.order_posts()), 2)                   # never sent twice
        lookups = [urllib.parse.parse_qs(r["query"]) for r in self.order_lookups()]
        self.assertEqual([q.get("clOrdId") for q in lookups], [["fmz101"], ["fmz102"]])
        self.assert_still_serves()

    def test_order_lost_before_okx_processed_it_is_not_placed(self):
        kinds = {201: "timeout", 202: "reset", 203: "http500", 204: "garbage"}
        for nonce, kind in kinds.items():
            self.fake.fault("/api/v5/trade/order", kind)
            answer = self.trade(nonce)
            self.assertIn("not placed", answer.get("error", ""), (kind, answer))
            self.assertIn("fmz%d" % nonce, answer["error"])
            self.assertEqual(self.fake.orders(), [], kind)
        self.assertEqual(len(self.order_posts()), 4)                   # each sent once, none re-sent
        looked_up = set(urllib.parse.parse_qs(r["query"])["clOrdId"][0] for r in self.order_lookups())
        self.assertEqual(looked_up, set("fmz%d" % nonce for nonce in kinds))   # each looked up by its clOrdId
        self.place()
        self.assertEqual(len(self.fake.orders()), 1)

    def test_outcome_unknown_when_the_lookup_fails_too(self):
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        self.fake.fault("/api/v5/trade/order", "http500")              # the lookup by clOrdId
        answer = self.trade(301)
        self.assertIn("unknown", answer.get("error", ""), answer)
        self.assertIn("fmz301", answer["error"])
        self.assertEqual(len(self.fake.orders()), 1)
        self.assertEqual(len(self.order_posts()), 1)

    def test_repeated_nonce_answers_the_same_order_also_after_it_filled(self):
        first = self.trade(401)
        order = self.assert_one_order(first)
        self.fake.fill(order["ordId"])
        second = self.trade(401)
        self.assertEqual(second.get("data"), first["data"], second)
        self.assert_one_order(second)
        self.assertEqual(len(self.order_posts()), 1)

    def test_repeated_nonce_after_a_lost_answer_answers_the_same_order(self):
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        first = self.trade(501)
        self.assert_one_order(first)
        second = self.trade(501)
        self.assertEqual(second.get("data"), first["data"], second)
        self.assert_one_order(second)

    def test_repeated_nonce_after_an_unknown_outcome_never_places_a_second_order(self):
        # The first request's answer and its lookup are both lost; the order then fills (it is no longer
        # pending, so OKX would accept the same clOrdId again). The docker repeats the request.
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        self.fake.fault("/api/v5/trade/order", "http500")
        self.assertIn("unknown", self.trade(601).get("error", ""))
        self.fake.fill(self.fake.orders()[0]["ordId"])
        self.assert_one_order(self.trade(601))

    def test_concurrent_requests_with_one_nonce_place_one_order(self):
        # The first request's order is placed, and its answer held back until all three requests are
        # inside the plugin; then it is lost.
        relay = self.relay()
        relay.hold_answer()
        server = self.start_plugin(api_base=relay.base_url)
        placer, claims = server.exchanges["okx"].orders, []
        claim = placer._claim
        placer._claim = lambda key: claims.append(key) or claim(key)
        answers = []

        def robot():
            docker = Docker(server.server_address[1])
            answers.append(docker.call("trade", ORDER, nonce=701))
            docker.close()
        robots = [threading.Thread(target=robot) for _ in range(3)]
        for thread in robots:
            thread.start()
        self.assertTrue(relay.holding.wait(5))
        self.assertTrue(wait_for(lambda: len(claims) == 3, timeout=5))
        relay.release()
        for thread in robots:
            thread.join()
        self.assertEqual(len(answers), 3)
        for answer in answers:
            self.assert_one_order(answer)
        self.assertEqual(len(self.order_posts()), 1)

    def test_order_carries_exptime_of_okx_time_within_the_timeout(self):
        for skew in (0, 60000, -60000):
            self.fake.clock_skew_ms = skew
            server = self.start_plugin(timeout=1.5)          # a new plugin reads OKX's clock afresh
            docker = Docker(server.server_address[1])
            self.addCleanup(docker.close)
            before = self.fake.now_ms()
            self.assertIn("data", docker.call("trade", ORDER), skew)
            after = self.fake.now_ms()
            exp_time = self.order_posts()[-1]["headers"].get("expTime", "")
            self.assertRegex(exp_time, r"^\d{13}$")
            timeout_ms = server.config.timeout * 1000
            self.assertGreater(int(exp_time), before + timeout_ms * 0.5, skew)
            self.assertLessEqual(int(exp_time), after + timeout_ms + 1000, skew)   # 1 s: clock-sync error
        self.assertEqual(len(self.fake.orders()), 3)

    def test_order_that_arrives_after_its_exptime_is_never_executed(self):
        relay = self.relay()
        relay.hold_order()                           # the order is still in transit when the plugin answers
        docker = Docker(self.start_plugin(api_base=relay.base_url, timeout=1.5).server_address[1])
        self.addCleanup(docker.close)
        answer, elapsed = self.timed("trade", ORDER, docker=docker, nonce=801)
        self.assertIn("not placed", answer.get("error", ""), answer)
        self.assertEqual(relay.deliver()["data"][0]["sCode"], "50037")      # it reaches OKX's engine late
        self.assertEqual(len(self.order_posts()), 1)
        self.assertEqual(self.fake.orders(), [])
        self.assert_still_serves()

    def test_reset_while_the_order_is_still_in_transit_is_not_called_not_placed(self):
        # The connection breaks at once, but the order is still on its way inside OKX: the first lookup
        # finds nothing, and the order is executed after it, before its expTime. Saying "not placed"
        # then would make the robot place it again.
        relay = self.relay()
        relay.hold_order(deliver_on_lookup=True)
        server = self.start_plugin(api_base=relay.base_url, timeout=1.5)
        docker = Docker(server.server_address[1])
        self.addCleanup(docker.close)
        answer, elapsed = self.timed("trade", ORDER, docker=docker, nonce=901)
        self.assertTrue(relay.delivered.is_set())
        self.assertEqual(relay.late_answer["data"][0]["sCode"], "0")
        orders = self.fake.orders()
        self.assertEqual(len(orders), 1)                # OKX did execute it
        self.assertEqual(answer.get("data"), {"id": "BTC-USDT," + orders[0]["ordId"]}, answer)
        self.assertEqual(len(self.order_lookups()), 2)  # found by the lookup after its expTime
        self.assertLess(elapsed, 2.0)


class OrderOutcomeTest(PluginTestCase):
    """OrderPlacer on its own, against the fake: every way an order can end is one typed outcome, and
    what it learnt of a client id answers the next request with that id."""

    CREDENTIALS = plugin.Credentials(KEY, SECRET, PASSPHRASE)

    def placer(self, api_base=None):
        client = plugin.OKXClient(plugin.Config(api_base=api_base or self.fake.base_url, timeout=1.5,
                                                clock=self.clock, stream=False))
        self.addCleanup(client.close)
        return plugin.OrderPlacer(client)

    def place(self, placer, client_id, **fields):
        body = dict({"instId": "BTC-USDT", "tdMode": "cash", "clOrdId": client_id, "side": "buy",
                     "ordType": "limit", "px": "30000", "sz": "0.01"}, **fields)
        return placer.place(plugin.PLAIN_ORDER, self.CREDENTIALS, "BTC-USDT", body, self.clock.monotonic() + 1.5)

    def lookups(self):
        return [urllib.parse.parse_qs(r["query"]) for r in self.order_lookups()]

    def test_kinds_say_how_an_order_is_placed_and_found_again(self):
        self.assertEqual(plugin.PLAIN_ORDER.lookup("BTC-USDT", "c1"),
                         ("/api/v5/trade/order", {"clOrdId": "c1", "instId": "BTC-USDT"}))
        self.assertTrue(plugin.PLAIN_ORDER.expires)
        self.assertEqual(plugin.ALGO_ORDER.lookup("BTC-USDT", "a1"),
                         ("/api/v5/trade/order-algo", {"algoClOrdId": "a1"}))
        self.assertFalse(plugin.ALGO_ORDER.expires)        # OKX has no expTime for algo orders

    def test_an_order_okx_accepts_is_placed(self):
        outcome = self.place(self.placer(), "oo1")
        self.assertIsInstance(outcome, plugin.Placed)
        self.assertEqual(outcome.exchange_id, self.fake.orders()[0]["ordId"])
        self.assertEqual(outcome.raw["data"][0]["sCode"], "0")
        self.assertRegex(self.order_posts()[0]["headers"]["expTime"], r"^\d{13}$")
        self.assertEqual(self.lookups(), [])

    def test_a_lost_answer_found_by_its_client_id_is_placed(self):
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        outcome = self.place(self.placer(), "oo2")
        self.assertIsInstance(outcome, plugin.Placed)
        order = self.fake.orders()[0]
        self.assertEqual(outcome.exchange_id, order["ordId"])
        self.assertEqual((outcome.raw["code"], outcome.raw["data"][0]["clOrdId"]), ("0", "oo2"))
        self.assertEqual(len(self.order_posts()), 1)
        self.assertEqual(self.lookups(), [{"clOrdId": ["oo2"], "instId": ["BTC-USDT"]}])

    def test_no_order_once_its_exptime_has_passed_is_not_placed_and_may_be_placed_again(self):
        placer = self.placer()
        self.fake.fault("/api/v5/trade/order", "reset")              # lost before OKX saw it
        with self.assertRaises(plugin.OrderNotPlaced) as caught:
            self.place(placer, "oo3")
        self.assertIn("oo3", str(caught.exception))
        exp_time = int(self.order_posts()[0]["headers"]["expTime"])
        self.assertGreaterEqual(self.fake.now_ms(), exp_time + plugin.ORDER_EXPIRY_MARGIN * 1000)   # waited
        self.assertEqual(len(self.lookups()), 2)           # looked for at once, and once it could not execute
        self.assertEqual(self.fake.orders(), [])
        self.assertIsInstance(self.place(placer, "oo3"), plugin.Placed)   # nothing remembered: sent anew
        self.assertEqual(len(self.order_posts()), 2)

    def test_a_lookup_that_fails_too_is_unknown_and_the_next_request_looks_again_first(self):
        placer = self.placer()
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        self.fake.fault("/api/v5/trade/order", "http500")            # the lookup
        sent_at = self.clock.monotonic()
        with self.assertRaises(plugin.OrderOutcomeUnknown) as caught:
            self.place(placer, "oo4")
        outcome = caught.exception.outcome
        self.assertIsInstance(outcome, plugin.Unknown)
        self.assertTrue(caught.exception.maybe_sent)
        self.assertTrue(sent_at < outcome.until <= sent_at + 1.5, outcome)   # could execute until then
        self.assertIn("HTTP 500", outcome.reason)
        again = self.place(placer, "oo4")                             # the same client id once more
        self.assertIsInstance(again, plugin.Placed)
        self.assertEqual(again.exchange_id, self.fake.orders()[0]["ordId"])
        self.assertEqual(len(self.order_posts()), 1)                        # found, not sent again
        self.assertEqual(len(self.fake.orders()), 1)

    def test_the_memory_answers_a_repeated_client_id_without_asking_okx(self):
        placer = self.placer()
        first = self.place(placer, "oo5")
        self.fake.clear_requests()
        again = self.place(placer, "oo5", px="31000")                # whatever the body says now
        self.assertEqual((again.exchange_id, again.raw), (first.exchange_id, None))
        self.assertEqual(self.fake.requests, [])

    def test_an_order_okx_refuses_raises_its_code_and_leaves_nothing_remembered(self):
        placer = self.placer()
        with self.assertRaises(plugin.ExchangeError) as caught:
            self.place(placer, "oo6", sz="10")                        # 51008: insufficient balance
        self.assertEqual(caught.exception.code, "51008")
        self.assertIsInstance(self.place(placer, "oo6"), plugin.Placed)
        self.assertEqual(len(self.order_posts()), 2)

    def test_concurrent_requests_with_one_client_id_place_one_order(self):
        relay = self.relay()
        relay.hold_answer()                       # the first answer waits until all three are in
        placer, claims = self.placer(relay.base_url), []
        claim = placer._claim
        placer._claim = lambda key: claims.append(key) or claim(key)
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(self.place(placer, "oo7"))) for _ in range(3)]
        for thread in threads:
            thread.start()
        self.assertTrue(relay.holding.wait(5))
        self.assertTrue(wait_for(lambda: len(claims) == 3))
        relay.release()
        for thread in threads:
            thread.join(5)
        self.assertEqual(len(outcomes), 3)
        self.assertEqual(set(outcome.exchange_id for outcome in outcomes), {self.fake.orders()[0]["ordId"]})
        self.assertEqual(len(self.order_posts()), 1)
        self.assertEqual(len(self.fake.orders()), 1)


# OKX's HTTP status with each code (OKX's v5 docs); 200 for the others.
OKX_CODE_STATUS = {"50001": 503, "50004": 400, "50011": 429, "50013": 429, "50026": 500, "50102": 401,
                   "51149": 500}


def okx_refusal(code, clord_id=""):
    """OKX's answer carrying ``code``: per order (``sCode``) for the 51xxx codes of one order, else as the
    envelope's code."""
    if code in ("51016", "51065"):
        return {"code": "1", "msg": "", "data": [{"ordId": "", "clOrdId": clord_id, "tag": "", "ts": "",
                                                   "sCode": code, "sMsg": "from the relay"}]}
    return {"code": code, "msg": "from the relay", "data": []}


class CodeActionTest(PluginTestCase):
    """What each OKX code asks of the plugin is data (CODE_ACTIONS), and each is acted on as it says:
    RESYNC re-reads OKX's clock and sends once more, RETRY waits for the window and sends once more,
    RECOVER (an order's outcome left open) finds the order by its clOrdId and never posts it again.
    Every hint of ERROR_HINTS reaches the docker in the error's text."""

    def setUp(self):
        super().setUp()
        self.okx = self.relay()                   # answers what the test scripts, passes on the rest
        self.docker = Docker(self.start_plugin(api_base=self.okx.base_url).server_address[1])
        self.addCleanup(self.docker.close)

    @staticmethod
    def codes(action):
        return sorted(code for code, wanted in plugin.CODE_ACTIONS.items() if wanted is action)

    def sent(self, method, path, text=""):
        """Requests the plugin sent through the relay for (method, path) whose body holds ``text``."""
        return [seen for seen in self.okx.seen if seen[:2] == (method, path) and text in seen[2]]

    def test_every_code_has_one_of_the_three_actions(self):
        self.assertEqual(set(plugin.CODE_ACTIONS.values()), {plugin.RESYNC, plugin.RETRY, plugin.RECOVER})
        self.assertEqual(self.codes(plugin.RESYNC), ["50036", "50102"])
        self.assertEqual(self.codes(plugin.RETRY), ["50011"])
        self.assertEqual(self.codes(plugin.RECOVER), ["50001", "50004", "50013", "50026", "51016", "51065", "51149"])

    def test_resync_codes_read_okx_clock_again_and_send_once_more(self):
        self.assertIn("data", self.docker.call("accounts"))          # the first sync, before the count
        for nonce, code in enumerate(self.codes(plugin.RESYNC), start=2001):
            with self.subTest(code=code):
                syncs = len(self.sent("GET", "/api/v5/public/time"))
                self.okx.answer("POST", "/api/v5/trade/order", okx_refusal(code), OKX_CODE_STATUS.get(code, 200))
                answer = self.docker.call("trade", ORDER, nonce=nonce)
                self.assertIn("data", answer, answer)
                self.assertEqual(len(self.sent("GET", "/api/v5/public/time")), syncs + 1)
                self.assertEqual(len(self.sent("POST", "/api/v5/trade/order", "fmz%d" % nonce)), 2)
                self.okx.answer("POST", "/api/v5/trade/order", okx_refusal(code), OKX_CODE_STATUS.get(code, 200),
                                count=2)           # refused again after the re-sync: once is enough
                answer = self.docker.call("trade", ORDER, nonce=nonce + 100)
                self.assertIn("OKX %s" % code, answer.get("error", ""), answer)
                self.assertEqual(len(self.sent("POST", "/api/v5/trade/order", "fmz%d" % (nonce + 100))), 2)
                self.assertEqual(len(self.sent("GET", "/api/v5/public/time")), syncs + 2)
        self.assertEqual(len(self.fake.orders()), len(self.codes(plugin.RESYNC)))

    def test_retry_codes_wait_for_the_window_and_send_once_more(self):
        for code in self.codes(plugin.RETRY):
            for method, path, call in (("GET", "/api/v5/account/balance", ("accounts", {})),
                                       ("POST", "/api/v5/trade/order", ("trade", ORDER))):
                with self.subTest(code=code, path=path):
                    before, waited_from = len(self.sent(method, path)), self.clock.monotonic()
                    self.okx.answer(method, path, okx_refusal(code), OKX_CODE_STATUS.get(code, 200))
                    self.assertIn("data", self.docker.call(*call))
                    self.assertEqual(len(self.sent(method, path)), before + 2)
                    self.assertGreaterEqual(self.clock.monotonic() - waited_from, 2.0)   # a whole window
                    self.okx.answer(method, path, okx_refusal(code), OKX_CODE_STATUS.get(code, 200), count=2)
                    self.assertIn("OKX %s" % code, self.docker.call(*call).get("error", ""))
                    self.assertEqual(len(self.sent(method, path)), before + 4)
        self.assertEqual(len(self.fake.orders()), len(self.codes(plugin.RETRY)))

    def test_recover_codes_on_an_order_look_it_up_and_never_post_it_again(self):
        for nonce, code in enumerate(self.codes(plugin.RECOVER), start=3001):
            for processed in (True, False):       # OKX did place it, or did not
                clord_id = "fmz%d" % (nonce + (0 if processed else 100))
                with self.subTest(code=code, placed=processed):
                    self.okx.answer("POST", "/api/v5/trade/order", okx_refusal(code, clord_id),
                                    OKX_CODE_STATUS.get(code, 200), process=processed)
                    answer = self.docker.call("trade", ORDER, nonce=int(clord_id[3:]))
                    placed = [o for o in self.fake.orders() if o["clOrdId"] == clord_id]
                    self.assertEqual(len(self.sent("POST", "/api/v5/trade/order", clord_id)), 1)
                    lookups = [seen for seen in self.okx.seen if seen[:2] == ("GET", "/api/v5/trade/order")]
                    self.assertTrue(lookups, code)
                    if processed:
                        self.assertEqual(answer.get("data"), {"id": "BTC-USDT," + placed[0]["ordId"]}, answer)
                    else:
                        self.assertIn("not placed", answer.get("error", ""), answer)
                        self.assertEqual(placed, [])
                    del self.okx.seen[:]

    def test_every_hint_reaches_the_docker_in_the_error(self):
        errors = {}
        for code, hint in sorted(plugin.ERROR_HINTS.items()):
            with self.subTest(code=code):
                self.okx.clear()
                self.okx.answer("GET", "/api/v5/account/balance", okx_refusal(code), OKX_CODE_STATUS.get(code, 200),
                                count=2)            # twice: a code that is acted on comes back once more
                errors[code] = self.docker.call("accounts").get("error", "")
                self.assertIn("OKX %s: from the relay" % code, errors[code])
                self.assertIn(hint.format(path="/api/v5/account/balance", limit=" (10 requests per 2 s)"),
                              errors[code])
        self.assertIn("/api/v5/account/balance (10 requests per 2 s)", errors["50011"])   # which limit

    def test_an_order_id_okx_does_not_know_answers_the_51603_hint(self):
        error = self.docker.call("order", {"id": "BTC-USDT,1234567890123456789", "symbol": "BTC_USDT"})["error"]
        self.assertIn("OKX 51603", error)
        self.assertIn(plugin.ERROR_HINTS["51603"], error)


# ---- OKX's clock ----

class ClockSkewTest(HardeningTestCase):
    """Signed calls work whatever this machine's clock says, OKX's time being read from /public/time."""

    def test_signed_calls_work_with_okx_a_minute_ahead_or_behind(self):
        for skew in (60000, -60000):
            self.fake.clock_skew_ms = skew
            server = self.start_plugin()
            docker = Docker(server.server_address[1])
            self.addCleanup(docker.close)
            self.assertIn("data", docker.call("accounts"), skew)
            answer = docker.call("trade", ORDER)
            self.assertIn("data", answer, (skew, answer))
            self.assertIn("data", docker.call("orders", {"symbol": "BTC_USDT"}), skew)
        self.assertEqual(len(self.fake.orders()), 2)
        self.assertEqual(len(self.okx_calls("/api/v5/public/time")), 2)     # read once by each plugin

    def test_clock_jump_after_the_first_sync_is_followed(self):
        self.assertIn("data", self.docker.call("accounts"))
        for skew in (60000, -60000):
            self.fake.clock_skew_ms = skew
            self.place()                                       # OKX refuses the time (50102) once
            self.assertIn("data", self.docker.call("accounts"), skew)
        self.assertEqual(len(self.fake.orders()), 2)
        self.assertEqual(len(self.order_posts()), 4)          # each refused once unprocessed, then placed once
        self.assert_still_serves()


class ExchangeTimeTest(HardeningTestCase):
    """OKX's time is read once and then kept on the monotonic clock: a step of this machine's wall clock
    (NTP, a VM resumed, an operator) changes neither the signatures' timestamps nor expTime, and so never
    lets an order whose answer was lost execute after the plugin said it would not."""

    WALL_OFFSETS = (10, -10, 3600, -3600)      # seconds this machine's clock is off OKX's after a step

    def step_wall_to(self, offset):
        """Step the host's wall clock so that it is ``offset`` seconds off the true (OKX's) time."""
        self.clock.step_wall(offset - (self.clock.time() - self.clock.true_time()))

    @staticmethod
    def stamp_ms(request):
        moment = dt.datetime.strptime(request["headers"]["OK-ACCESS-TIMESTAMP"], "%Y-%m-%dT%H:%M:%S.%fZ")
        return int(round(moment.replace(tzinfo=dt.timezone.utc).timestamp() * 1000))

    def test_timestamps_and_exptime_keep_okx_time_across_wall_clock_steps(self):
        self.assertIn("data", self.docker.call("accounts"))            # OKX's clock read, once
        exp_offsets = {}
        for offset in (0,) + self.WALL_OFFSETS:
            self.step_wall_to(offset)
            self.fake.clear_requests()
            self.assertIn("data", self.docker.call("trade", ORDER), offset)
            self.assertIn("data", self.docker.call("accounts"), offset)
            okx_now = self.fake.now_ms()                   # the clock stood still during both calls
            self.assertEqual([r["path"] for r in self.fake.requests],
                             ["/api/v5/trade/order", "/api/v5/account/balance"], offset)   # no 50102, no re-sync
            for request in self.fake.requests:
                self.assertLessEqual(abs(self.stamp_ms(request) - okx_now), 100, (offset, request["path"]))
            exp_offsets[offset] = int(self.fake.requests[0]["headers"]["expTime"]) - okx_now
        self.assertTrue(0 < exp_offsets[0] <= self.server.config.timeout * 1000, exp_offsets)
        for offset in self.WALL_OFFSETS:
            self.assertLessEqual(abs(exp_offsets[offset] - exp_offsets[0]), 100, (offset, exp_offsets))
        self.assertEqual(len(self.fake.orders()), 5)

    def test_an_order_lost_in_transit_under_a_wall_clock_step_is_never_placed_twice(self):
        relay = self.relay()
        docker = Docker(self.start_plugin(api_base=relay.base_url).server_address[1])
        self.addCleanup(docker.close)
        self.assertIn("data", docker.call("accounts"))                 # OKX's clock read, before the steps
        for nonce, offset in enumerate(self.WALL_OFFSETS, start=1001):
            self.step_wall_to(offset)
            relay.hold_order()                     # the connection breaks; the order is still on its way
            answer = docker.call("trade", ORDER, nonce=nonce)
            relay.deliver()                        # and reaches OKX after the plugin answered
            clord_id = "fmz%d" % nonce
            placed = [order for order in self.fake.orders() if order["clOrdId"] == clord_id]
            posts = [seen for seen in relay.seen if seen[0] == "POST" and clord_id in seen[2]]
            self.assertEqual(len(posts), 1, offset)                   # it reached OKX once: never re-sent
            if "data" in answer:
                self.assertEqual([answer["data"]["id"]], ["BTC-USDT," + order["ordId"] for order in placed])
            else:
                self.assertRegex(answer["error"], "not placed|unknown", offset)
                if "not placed" in answer["error"]:
                    self.assertEqual(placed, [], "said not placed, but OKX executed it (offset %+d s)" % offset)
                    self.assertEqual(relay.late_answer["data"][0]["sCode"], "50037")


class UnreadClockOrderTest(HardeningTestCase):
    """While OKX's clock has never been read, expTime is stamped with this machine's clock, which may be
    seconds off OKX's: an order whose answer was lost and that OKX does not have is unknown then, never
    "not placed" (OKX may still execute it)."""

    def test_a_lost_order_is_unknown_until_okx_clock_was_read(self):
        self.fake.fault("/api/v5/public/time", "http500", count=1000)  # OKX's clock cannot be read
        self.clock.step_wall(10)              # this machine is 10 s ahead: expTime is 10 s later at OKX
        relay = self.relay()
        docker = Docker(self.start_plugin(api_base=relay.base_url).server_address[1])
        self.addCleanup(docker.close)
        relay.hold_order()                    # the connection breaks; the order is still on its way
        answer = docker.call("trade", ORDER, nonce=1101)
        error = answer.get("error", "")
        self.assertIn("the order's outcome is unknown", error, answer)
        self.assertIn("OKX has no order with clOrdId fmz1101, but OKX's clock could not be read", error)
        self.assertIn("check open orders before placing it again", error)
        self.assertEqual(relay.deliver()["data"][0]["sCode"], "0")    # it reaches OKX late, and executes
        again = docker.call("trade", ORDER, nonce=1101)                # the docker repeats it: found, not re-sent
        order, = self.fake.orders()
        self.assertEqual(again.get("data"), {"id": "BTC-USDT," + order["ordId"]}, again)
        self.assertEqual(len([seen for seen in relay.seen if seen[:2] == ("POST", "/api/v5/trade/order")]), 1)
        self.assertTrue(any("could not read OKX's clock" in line for line in LOGS.lines))


# ---- Secrets and TLS ----

class SecretTest(HardeningTestCase):
    """No secret key, passphrase or signature in any answer or log line, whatever happens."""

    WRONG_SECRET, WRONG_PASSPHRASE = "9F8E7D6C5B4A39281706F5E4D3C2B1A0", "Wrong-Pass-9"

    def secrets(self):
        signatures = [r["headers"]["OK-ACCESS-SIGN"] for r in self.fake.requests if "OK-ACCESS-SIGN" in r["headers"]]
        return [SECRET, PASSPHRASE, DEMO_SECRET, DEMO_PASSPHRASE, self.WRONG_SECRET, self.WRONG_PASSPHRASE], signatures

    def assert_nothing_shows(self, texts):
        secrets, signatures = self.secrets()
        for text in list(texts) + LOGS.lines:
            for secret in secrets + signatures:
                self.assertNotIn(secret, text)

    def test_no_secret_in_answers_or_logs_of_a_mix_of_calls(self):
        answers = []

        def call(method, params=None, **fields):
            answers.append(json.dumps(self.docker.call(method, params, **fields)))
        call("accounts")
        call("trade", ORDER)
        call("trade", dict(ORDER, price="40000", amount="10"))                  # 51008
        call("accounts", secret_key=self.WRONG_SECRET + "," + PASSPHRASE)         # 50113
        call("accounts", secret_key=SECRET + "," + self.WRONG_PASSPHRASE)        # 50105
        call("accounts", secret_key=SECRET)                                       # no passphrase
        call("trade", ORDER, secret_key=SECRET + ",,simulate")
        call("accounts", access_key=DEMO_KEY, secret_key=DEMO_SECRET + "," + DEMO_PASSPHRASE)   # 50101
        call("accounts", access_key=DEMO_KEY, secret_key=DEMO_SECRET_FIELD)
        call("accounts", access_key="no-such-key")                               # 50111
        self.fake.fault("/api/v5/account/balance", "http500")
        call("accounts")
        self.fake.fault("/api/v5/trade/order", "reset_after_process")
        call("trade", ORDER)
        self.fake.fault("/api/v5/trade/order", "reset")
        call("trade", ORDER)
        call("cancel", {"id": "BTC-USDT,123", "symbol": "BTC_USDT"})
        call("__api_/api/v5/account/balance")
        call("__api_/api/v5/trade/order", {"instId": "BTC-USDT"}, headers={"Http-Method": "DELETE"})
        call("__api_/api/v5/trade/order", {"instId": "BTC-USDT"}, headers={"Http-Method": "PUT"})
        call("fly", {"secret": "x"})
        for body in (('{"access_key":"%s","secret_key":"%s","method":"trade",oops' % (KEY, SECRET_FIELD)),
                     ('{"access_key":"%s","secret_key":["%s","%s"],"method":"accounts"}' % (KEY, SECRET, PASSPHRASE))):
            answers.append(json.dumps(self.docker.send(body.encode())[1]))
        self.assertGreater(len(self.secrets()[1]), 10)          # many signed requests were made
        self.assertGreater(len([a for a in answers if '"error"' in a]), 10)
        self.assert_nothing_shows(answers)

    def test_bytes_after_a_short_content_length_are_not_echoed(self):
        # A docker whose Content-Length is too small leaves the rest of its body, secret_key last, to be
        # read as the next request line. The error about that line must not repeat it.
        body = ('{"access_key": "%s", "nonce": 1, "method": "ticker", "params": {"symbol": "BTC_USDT"}, '
                '"secret_key": "%s"}\r\n' % (KEY, SECRET_FIELD)).encode()
        docker = RawDocker(self.server.server_address[1], timeout=3)
        self.addCleanup(docker.close)
        docker.send(request_bytes(body, content_length=20))
        received = b""
        try:
            while True:
                chunk = docker.sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
        self.assertIn(b'"error"', received)
        self.assert_nothing_shows([received.decode("utf-8", "replace")])
        self.assert_still_serves()


class TlsTest(HardeningTestCase):
    """Certificates of OKX are always verified; --ca-file adds a CA to trust."""

    fake_options = {"tls": True}

    def test_certificate_that_cannot_be_verified_is_refused(self):
        for method, params in (("ticker", {"symbol": "BTC_USDT"}), ("accounts", {}), ("trade", ORDER)):
            error = self.error(method, params)
            self.assertIn("certificate", error)
            self.assertIn("could not be verified", error)
        self.assertEqual(self.fake.requests, [])               # nothing, keys included, was sent
        self.assertEqual(self.fake.orders(), [])

    def test_certificate_of_the_given_ca_file_is_trusted(self):
        for host in ("127.0.0.1", "localhost"):
            api_base = self.fake.base_url.replace("127.0.0.1", host)
            server = self.start_plugin(api_base=api_base, ca_file=self.fake.cert_path)
            docker = Docker(server.server_address[1])
            self.addCleanup(docker.close)
            self.assertEqual(docker.call("ticker", {"symbol": "BTC_USDT"}).get("data", {}).get("symbol"), "BTC_USDT")
            self.assertIn("data", docker.call("accounts"))
            self.assertIn("data", docker.call("trade", ORDER))
        self.assertEqual(len(self.fake.orders()), 2)


# ---- The command line ----

class PluginProcessTestCase(unittest.TestCase):
    """Tests of the plugin as a process: start it with flags, see what it printed and how it ended."""

    def nowhere(self):
        return ["--api-base", "http://127.0.0.1:%d" % free_port(), "--no-stream"]

    def start(self, *args, env=None):
        process = PluginProcess(*args, env=env)
        self.addCleanup(process.kill)
        return process

    def start_with_fake(self, *args):
        """A plugin process (``args`` its flags) on a FakeOKX of its own, and a docker for it; all three are
        stopped after the test."""
        fake = FakeOKX().start()
        self.addCleanup(fake.stop)
        process = self.start("--port", "0", "--api-base", fake.base_url, *args)
        docker = Docker(process.port())
        self.addCleanup(docker.close)
        return fake, process, docker

    def assert_refused(self, *flag_sets, status=None):
        """Each set of flags (a list, or a pair (list, environment)) ends the plugin at start with one line
        on stderr, no traceback, and a failure status (``status`` when given); the processes run side by
        side. Returns what each printed, in order."""
        processes = []
        for flags in flag_sets:
            args, env = flags if isinstance(flags, tuple) else (flags, None)
            argv = ["--port", "0", "--no-stream"] + args if "--port" not in args else args
            processes.append((args, self.start(*argv, env=env)))
        printed = []
        for args, process in processes:
            with self.subTest(args=args):
                started = process.wait_for(r"listening on", 5)      # None once it has exited
                process.kill()
                printed.append(process.stderr)
                self.assertIsNone(started, "the plugin accepted %s and started" % args)
                self.assertNotIn(process.process.returncode, (0, None), process.stderr[-700:])
                if status is not None:
                    self.assertEqual(process.process.returncode, status, process.stderr[-700:])
                self.assertEqual(len(process.lines), 1, process.stderr[-700:])
                self.assertNotIn("Traceback", process.stderr)
        return printed


class CommandLineTest(PluginProcessTestCase):
    """The plugin as an operator runs it: flags, signals, its port taken, log lines."""

    def test_sigterm_and_sigint_stop_within_a_second_with_status_0(self):
        processes = {signum: self.start("--port", "0", *self.nowhere()) for signum in (signal.SIGTERM, signal.SIGINT)}
        for signum, process in processes.items():
            docker = Docker(process.port())             # a robot's kept-alive connection stays open
            self.addCleanup(docker.close)
            self.assertIn("unknown method", docker.call("fly").get("error", ""))
            status, elapsed = process.stop(signum)
            self.assertEqual(status, 0, (signum, process.stderr))
            self.assertLess(elapsed, 1.0)
            self.assertNotIn("Traceback", process.stderr)

    def test_port_in_use_is_one_line_and_a_failure_status(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            status, stdout, stderr = run_plugin("--port", str(port), *self.nowhere())
        self.assertNotIn(status, (0, None))
        self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
        self.assertIn(str(port), stderr)
        self.assertNotIn("Traceback", stderr)

    def test_wrong_flags_and_values_are_one_line_and_a_failure_status(self):
        self.assert_refused(["--bogus"], ["--port", "abc"], ["--port", "70000"], ["--port", "-1"],
                            ["--timeout", "0"], ["--timeout", "nan"], ["--timeout", "inf"], ["--stream-idle", "nan"],
                            ["--margin-mode", "both"], ["--log-level", "loud"], ["--api-base", "ftp://okx.com"],
                            ["--api-base", "http://[oops"], ["--proxy", "ftp://proxy"], ["--ca-file", "/no/such/file"],
                            ["--ws-base", "https://ws.okx.com"], ["--address", "999.1.2.3"])

    def test_help_mentions_every_flag(self):
        status, stdout, stderr = run_plugin("--help")
        self.assertEqual(status, 0)
        for flag in ("--address", "--port", "--api-base", "--timeout", "--margin-mode", "--proxy", "--ca-file",
                     "--ws-base", "--no-stream", "--stream-idle", "--log-level", "--version"):
            self.assertIn(flag, stdout)

    def test_log_lines_carry_time_level_and_docker_method(self):
        fake, process, docker = self.start_with_fake("--no-stream", "--log-level", "debug")
        self.assertIn("data", docker.call("ticker", {"symbol": "BTC_USDT"}))
        self.assertIn("error", docker.call("ticker", {"symbol": "NOPE_USDT"}))
        stamp = r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d{3} "
        self.assertIsNotNone(process.wait_for(stamp + r"DEBUG \[ticker\] .*/api/v5/market/ticker", 5), process.stderr)
        self.assertIsNotNone(process.wait_for(stamp + r"WARNING \[ticker\] .*51001", 5), process.stderr)
        self.assertIsNotNone(process.wait_for(stamp + r"INFO \[-\] .*listening", 1), process.stderr)
        status, _ = process.stop()
        self.assertEqual(status, 0)
        for line in process.lines:
            self.assertRegex(line, stamp + r"(DEBUG|INFO|WARNING|ERROR) \[[^\]]+\] ")

    def test_address_other_than_loopback_is_warned_about(self):
        anywhere = self.start("--address", "0.0.0.0", "--port", "0", *self.nowhere())
        loopback = self.start("--address", "127.0.0.1", "--port", "0", *self.nowhere())
        anywhere.port()
        warning = anywhere.wait_for(r"WARNING .*0\.0\.0\.0", 2)
        self.assertIsNotNone(warning, anywhere.stderr)
        self.assertIn("127.0.0.1", warning)
        anywhere.stop()
        loopback.port()
        loopback.stop()
        self.assertNotIn("WARNING", loopback.stderr)


class StopMidCallTest(PluginProcessTestCase):
    """A stop while a call is with OKX waits up to STOP_DRAIN_SECONDS for it, still exits 0 within a second,
    and names an order call that may have reached OKX, so the operator can check it there; a read it does
    not name."""

    def test_a_stop_during_a_trade_names_it_and_a_stop_during_a_read_does_not(self):
        calls = {"/api/v5/trade/order": ("trade", ORDER), "/api/v5/market/ticker": ("ticker", {"symbol": "BTC_USDT"})}
        plugins = {}
        for path, (method, params) in calls.items():         # two plugins side by side, stopped at once
            fake, process, docker = self.start_with_fake("--no-stream", "--timeout", "5")
            self.assertIn("data", docker.call("accounts"))      # the clock synced, the connection made
            fake.fault(path, "timeout")                         # OKX takes the call and never answers
            threading.Thread(target=self.call_quietly, args=(docker, method, params), daemon=True).start()
            plugins[path] = (fake, process)
        for path, (fake, process) in plugins.items():
            self.assertTrue(wait_for(lambda: any(r["path"] == path for r in fake.requests), 5), path)
        stops = {}
        stoppers = [threading.Thread(target=lambda path=path, process=process: stops.update({path: process.stop()}))
                    for path, (fake, process) in plugins.items()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(5)
        for path, (fake, process) in plugins.items():
            status, elapsed = stops[path]
            self.assertEqual(status, 0, process.stderr)
            self.assertLess(elapsed, 1.0)
            self.assertNotIn("Traceback", process.stderr)
        trade_process, ticker_process = (plugins[path][1] for path in calls)
        warned = [line for line in trade_process.lines if "stopped while serving" in line]
        self.assertEqual(len(warned), 1, trade_process.stderr)
        self.assertRegex(warned[0], r" WARNING \[-\] stopped while serving trade \(nonce \d+\): it may have "
                                    r"reached OKX; check the orders")
        self.assertNotIn("stopped while serving", ticker_process.stderr)

    @staticmethod
    def call_quietly(docker, method, params):
        """A call that expects no answer: the plugin stops in its middle."""
        try:
            docker.call(method, params)
        except (OSError, http.client.HTTPException):
            pass                                   # the connection closes as the plugin exits

def without_proxy_variables(**variables):
    """This process's environment without any *_proxy variable, plus ``variables``."""
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    env.update(variables)
    return env


def secret_pieces(secret):
    """The 3-character pieces of ``secret`` that the plugin's own text (its source) does not hold: an
    output holding one can only have it from the secret."""
    with open(PLUGIN_PATH, encoding="utf-8") as source:
        text = source.read()
    return sorted(set(piece for piece in (secret[i:i + 3] for i in range(len(secret) - 2)) if piece not in text))


class FlagCheckTest(PluginProcessTestCase):
    """Every URL flag is checked at start, in one line and exit status 2, exactly as it is used later:
    a stream base is ws/wss with a host, a valid port and no path; keys never travel in clear to a host
    other than this machine; a proxy's password may hold any character, and no part of a proxy URL, the
    flag's or a *_PROXY variable's, is ever shown."""

    MALFORMED_PROXIES = (("http://robot:s3cr#t", "s3cr#t"),                      # no host: robot:s3cr#t
                         ("http://robot:p@ss:word@host:notaport", "p@ss:word"),
                         ("socks5://u:pw@h:1", "u:pw"))

    def test_a_stream_base_is_ws_or_wss_with_a_host_a_port_and_no_path(self):
        printed = self.assert_refused(["--ws-base", "wss://"], ["--ws-base", "wss://ws.okx.com:99999"],
                                      ["--ws-base", "wss://h/path"], status=2)
        for text in printed:
            self.assertIn("--ws-base", text)

    def test_port_0_is_refused_at_start(self):
        self.assert_refused(["--ws-base", "wss://ws.okx.com:0"], ["--api-base", "https://www.okx.com:0"], status=2)

    def test_plain_schemes_reach_only_this_machine(self):
        printed = self.assert_refused(["--api-base", "http://www.okx.com"], ["--ws-base", "ws://ws.okx.com:8443"],
                                      status=2)
        for text in printed:
            self.assertIn("in clear", text)
        processes = [self.start("--port", "0", "--api-base", "http://127.0.0.1:%d" % free_port(), "--no-stream"),
                     self.start("--port", "0", "--ws-base", "ws://127.0.0.1:%d" % free_port(),
                                "--api-base", "http://127.0.0.1:%d" % free_port())]
        for process in processes:
            Docker(process.port()).close()
            self.assertEqual(process.stop()[0], 0, process.stderr)

    def test_a_ca_file_that_holds_no_certificate_is_refused_at_start(self):
        not_a_certificate = os.path.join(tempfile.mkdtemp(), "ca.pem")
        self.addCleanup(shutil.rmtree, os.path.dirname(not_a_certificate))
        with open(not_a_certificate, "w") as handle:
            handle.write("not a certificate\n")
        printed = self.assert_refused(["--ca-file", not_a_certificate], ["--ca-file", "/no/such/ca.pem"], status=2)
        self.assertIn("--ca-file %s holds no PEM CA certificates" % not_a_certificate, printed[0])
        self.assertIn("--ca-file /no/such/ca.pem does not exist", printed[1])

    def test_an_address_this_machine_does_not_have_is_exit_2(self):
        printed = self.assert_refused(["--address", "192.0.2.1", "--port", "0", "--no-stream"], status=2)
        self.assertIn("cannot listen on 192.0.2.1", printed[0])

    def test_schemes_are_read_in_any_case(self):
        printed = self.assert_refused(["--api-base", "HTTP://www.okx.com"], ["--ws-base", "WS://ws.okx.com:8443"],
                                      status=2)
        for text in printed:
            self.assertIn("in clear", text)
        fake = FakeOKX(tls=True).start()
        self.addCleanup(fake.stop)
        process = self.start("--port", "0", "--api-base", fake.base_url.replace("https://", "HTTPS://"),
                             "--ca-file", fake.cert_path, "--no-stream")
        docker = Docker(process.port())
        self.addCleanup(docker.close)
        self.assertEqual(docker.call("ticker", {"symbol": "BTC_USDT"}).get("data", {}).get("symbol"), "BTC_USDT")
        self.assertEqual(process.stop()[0], 0, process.stderr)

    def test_a_proxy_password_may_hold_any_character(self):
        fake = FakeOKX(tls=True).start()             # real time: the plugin runs in its own process
        self.addCleanup(fake.stop)
        proxy = FakeProxy(user="robot", password="s3cr#t").start()
        self.addCleanup(proxy.stop)
        proxy_url = proxy.url.replace("http://", "http://robot:s3cr#t@")
        process = self.start("--port", "0", "--api-base", fake.base_url, "--ca-file", fake.cert_path,
                             "--proxy", proxy_url, "--no-stream", env=without_proxy_variables())
        docker = Docker(process.port())
        self.addCleanup(docker.close)
        self.assertEqual(docker.call("ticker", {"symbol": "BTC_USDT"}).get("data", {}).get("symbol"), "BTC_USDT")
        self.assertEqual(proxy.tunnels, 1)
        self.assertEqual(proxy.auth_seen, ["Basic " + base64.b64encode(b"robot:s3cr#t").decode()])
        process.stop()
        for piece in secret_pieces("s3cr#t"):
            self.assertNotIn(piece, process.stderr)

    def test_no_part_of_a_proxy_password_is_ever_shown(self):
        cases = []
        for url, password in self.MALFORMED_PROXIES:
            cases += [((["--proxy", url], without_proxy_variables()), password),
                      (([], without_proxy_variables(HTTPS_PROXY=url)), password)]
        printed = self.assert_refused(*[flags for flags, _ in cases], status=2)
        for text, (flags, password) in zip(printed, cases):
            pieces = secret_pieces(password)
            self.assertTrue(pieces, password)
            for piece in pieces:
                self.assertNotIn(piece, text, flags)
        # a proxy URL that is fine but leads nowhere: the plugin starts, and its answers and lines hide it
        process = self.start("--port", "0", "--api-base", "https://127.0.0.1:%d" % free_port(), "--no-stream",
                             "--proxy", "http://robot:s3cr#t@127.0.0.1:%d" % free_port(), "--timeout", "2",
                             env=without_proxy_variables())
        docker = Docker(process.port())
        self.addCleanup(docker.close)
        answers = [json.dumps(docker.call(method, params)) for method, params in
                   (("ticker", {"symbol": "BTC_USDT"}), ("accounts", {}), ("trade", ORDER))]
        self.assertIn("cannot reach proxy", answers[0])
        process.stop()
        for piece in secret_pieces("s3cr#t"):
            for text in answers + process.lines:
                self.assertNotIn(piece, text)


class TruncatedAnswerTest(PluginTestCase):
    """OKX's answer breaks off after the request was carried out: an order is found again, not resent."""

    def test_truncated_order_answer_is_recovered_by_clordid(self):
        self.fake.fault("/api/v5/trade/order", "truncated_after_process")
        answer = self.docker.call("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"},
                                  nonce=777)
        self.assertNotIn("error", answer, answer)
        self.assertEqual([o["ordId"] for o in self.fake.orders()], [answer["data"]["id"].split(",")[1]])
        self.assertEqual(self.okx_calls("/api/v5/trade/order")[-1]["method"], "GET")     # looked up, not resent

    def test_truncated_market_data_answer_is_an_error_not_an_internal_one(self):
        self.fake.fault("/api/v5/market/ticker", "truncated_after_process")
        error = self.error("ticker", {"symbol": "BTC_USDT"})
        self.assertNotIn("internal error", error)
        self.assertIn("BTC_USDT", self.data("ticker", {"symbol": "BTC_USDT"})["symbol"])


class KeyFieldTest(PluginTestCase):
    """What the docker sends as keys is checked before it goes into a request header, and never logged."""

    def test_line_break_in_a_key_is_refused_and_never_logged(self):
        error = self.error("accounts", secret_key=SECRET + ",pass\nphrase")
        self.assertIn("printable", error)
        self.assertNotIn("phrase", error.replace("PASSPHRASE", ""))
        self.assertNotIn("pass\nphrase", "\n".join(LOGS.lines))
        self.assertNotIn("pass\\nphrase", "\n".join(LOGS.lines))
        self.assertIn("printable", self.error("accounts", access_key="key\u00e9"))
        self.assertEqual(self.okx_calls("/api/v5/account/balance"), [])
        self.assertIn("data", self.docker.call("accounts", access_key=KEY + "\n"))      # surrounding space stripped


class HistoryPagingTest(PluginTestCase):
    """historyorders reads the recent history, then the archive from where the recent one ends."""

    def test_archive_continues_where_the_recent_history_ends(self):
        recent = [self.fake.add_history_order("BTC-USDT", age_days=day) for day in (1, 2, 3)]
        old = [self.fake.add_history_order("BTC-USDT", age_days=day) for day in (20, 21, 22, 23, 24)]
        orders = self.data("historyorders", {"symbol": "BTC_USDT", "since": 0, "limit": 5})
        self.assertEqual([order["id"].split(",")[1] for order in orders], recent + old[:2])


class ServicePathTest(PluginTestCase):
    """The exchange is the service address's last path segment; exchange.IO paths are plain OKX paths."""

    def test_passthrough_path_must_be_a_plain_api_path(self):
        for path in ("/api/v5/market/ticker x", "/api/v5/market/ticker?instId=BTC-USDT", "/v5/market/ticker"):
            self.assertIn("exchange.IO path", self.error("__api_" + path, {"instId": "BTC-USDT"}))
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.data("__API_/api/v5/market/ticker", {"instId": "BTC-USDT"})["code"], "0")

    def test_exchange_is_the_last_path_segment(self):
        body = json.dumps({"method": "ticker", "params": {"symbol": "BTC_USDT"}}).encode()
        self.assertEqual(self.docker.send(body, path="/fmz/OKX")[1]["data"]["symbol"], "BTC_USDT")


class TradeTapeTest(unittest.TestCase):
    """The stream's trade tape: a pushed aggregate of matches replaces the single matches REST listed."""

    def test_pushed_aggregate_replaces_the_single_matches(self):
        tape = plugin.TradeTape()
        tape.merge([{"instId": "BTC-USDT", "tradeId": "123", "px": "1", "sz": "3", "side": "buy", "ts": "5",
                     "count": "3"}])
        tape.merge([{"instId": "BTC-USDT", "tradeId": str(n), "px": "1", "sz": "1", "side": "buy", "ts": "5"}
                    for n in (123, 122, 121, 120)])
        self.assertEqual([(row["tradeId"], row["sz"]) for row in tape.rows], [("123", "3"), ("120", "1")])
        self.assertNotIn("count", tape.rows[0])


class ContractKindTest(PluginTestCase):
    """A contract's symbol picks the kind of instruments markets and tickers list; the position mode and
    the leverage are kept per account and per underlying as OKX applies them."""

    def test_contract_symbol_picks_the_kind_of_markets_and_tickers(self):
        self.assertTrue(all(key.endswith(".swap") for key in self.data("markets", {"symbol": "BTC_USDT.swap"})))
        self.assertTrue(all(t["symbol"].endswith(".swap") for t in self.data("tickers", {"symbol": "eth_usdt.SWAP"})))
        self.assertIn("BTC_USDT", self.data("markets", {"symbol": "BTC_USDT"}))

    def test_position_mode_that_cannot_be_reread_keeps_okx_reason(self):
        self.data("trade", {"symbol": "BTC_USDT.swap", "type": "buy", "price": "30000", "amount": "1"})   # net mode read
        self.fake.set_position_mode("long_short_mode")
        self.fake.fault("/api/v5/account/config", "http503", count=5)
        error = self.error("trade", {"symbol": "BTC_USDT.swap", "type": "buy", "price": "30000", "amount": "1"})
        self.assertIn("OKX 51000", error)
        self.assertIn("posSide", error)

    def test_cross_leverage_is_remembered_per_underlying(self):
        params = {"symbol": "BTC_USD.quarter", "type": "buy", "price": "30000", "amount": "1", "leverage": "10"}
        self.data("trade", params)
        self.data("SetMarginLevel", {"symbol": "BTC_USD.this_week", "marginLevel": "5"})   # OKX: all BTC-USD futures
        self.data("trade", params)
        self.data("trade", params)
        levers = [json.loads(r["body"])["lever"] for r in self.okx_calls("/api/v5/account/set-leverage")]
        self.assertEqual(levers, ["10", "5", "10"])


# ---- Operations: proxies, rate limits, error hints ----

class ProxyTest(PluginTestCase):
    """OKX reached through an HTTP CONNECT proxy: flag, environment variables, refusals, secrecy."""

    fake_options = {"tls": True}

    def setUp(self):
        super().setUp()
        self.proxy = FakeProxy(user="robot", password="pr0xy-s3cret").start()
        self.addCleanup(self.proxy.stop)
        self.proxy_url = self.proxy.url.replace("http://", "http://robot:pr0xy-s3cret@")

    def docker_for(self, **options):
        options.setdefault("ca_file", self.fake.cert_path)
        server = self.start_plugin(**options)
        docker = Docker(server.server_address[1])
        self.addCleanup(docker.close)
        return docker

    def test_calls_go_through_one_kept_alive_tunnel(self):
        docker = self.docker_for(proxy=self.proxy_url)
        for _ in range(5):
            self.assertIn("data", docker.call("ticker", {"symbol": "BTC_USDT"}))
        self.assertIn("data", docker.call("accounts"))
        self.assertEqual((self.proxy.tunnels, self.fake.connections), (1, 1))
        self.assertEqual(set(self.proxy.auth_seen), {"Basic " + base64.b64encode(b"robot:pr0xy-s3cret").decode()})

    def test_https_proxy_variable_is_used_and_no_proxy_bypasses(self):
        with unittest.mock.patch.dict(os.environ, {"HTTPS_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
                                                   "NO_PROXY": "", "no_proxy": ""}):
            docker = self.docker_for()
        self.assertIn("data", docker.call("ticker", {"symbol": "BTC_USDT"}))
        self.assertEqual(self.proxy.tunnels, 1)
        with unittest.mock.patch.dict(os.environ, {"HTTPS_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
                                                   "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}):
            docker = self.docker_for()
        self.assertIn("data", docker.call("ticker", {"symbol": "BTC_USDT"}))
        self.assertEqual(self.proxy.tunnels, 1)

    def test_wrong_credentials_name_the_proxy_without_password(self):
        docker = self.docker_for(proxy=self.proxy.url.replace("http://", "http://robot:wrong-pass@"))
        error = docker.call("accounts")["error"]
        self.assertIn("407", error)
        self.assertIn("proxy " + self.proxy.url.replace("http://", "http://robot@"), error)
        self.assertNotIn("wrong-pass", error)
        self.assertNotIn("wrong-pass", "\n".join(LOGS.lines))

    def test_refusing_proxy_is_a_clear_error(self):
        for status in (403, 502):
            refusing = FakeProxy(refuse_status=status).start()
            self.addCleanup(refusing.stop)
            error = self.docker_for(proxy=refusing.url).call("ticker", {"symbol": "BTC_USDT"})["error"]
            self.assertIn("refused the tunnel", error)
            self.assertIn(str(status), error)

    def test_unreachable_proxy_fails_within_the_timeout(self):
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        closed = port.getsockname()[1]
        port.close()
        docker = self.docker_for(proxy="http://robot:pr0xy-s3cret@127.0.0.1:%d" % closed, timeout=2)
        started = time.monotonic()
        error = docker.call("ticker", {"symbol": "BTC_USDT"})["error"]
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertIn("cannot reach proxy http://robot@127.0.0.1:%d" % closed, error)
        self.assertNotIn("pr0xy-s3cret", error)

    def test_proxy_password_never_logged_at_debug(self):
        docker = self.docker_for(proxy=self.proxy_url)
        docker.call("ticker", {"symbol": "BTC_USDT"})
        docker.call("accounts")
        text = "\n".join(LOGS.lines)
        self.assertIn("DEBUG", text)
        self.assertNotIn("pr0xy-s3cret", text)
        self.assertNotIn(base64.b64encode(b"robot:pr0xy-s3cret").decode(), text)


class RateLimitTest(PluginTestCase):
    """OKX's limits kept on our side: robots sharing a key never see 50011, and wait only for their own bucket."""

    def test_limiter_waits_for_a_place_in_the_window(self):
        limiter = plugin.RateLimiter(self.clock, {("GET", "/x"): (3, 1, "ip")})
        bucket = limiter.bucket("GET", "/x", None, {})
        started = self.clock.monotonic()
        for _ in range(3):
            limiter.acquire(bucket, started + 5)
        self.assertEqual(self.clock.monotonic(), started)          # room for three at once
        limiter.acquire(bucket, started + 5)
        self.assertAlmostEqual(self.clock.monotonic() - started, 1 + plugin.RATE_WINDOW_MARGIN, places=6)

    def test_limiter_refuses_at_once_when_the_wait_exceeds_the_deadline(self):
        limiter = plugin.RateLimiter(self.clock, {("GET", "/x"): (2, 10, "ip")})
        bucket = limiter.bucket("GET", "/x", None, {})
        started = self.clock.monotonic()
        limiter.acquire(bucket, started + 1)
        limiter.acquire(bucket, started + 1)
        with self.assertRaises(plugin.RateLimited) as caught:
            limiter.acquire(bucket, started + 1)
        self.assertEqual(self.clock.monotonic(), started)          # no time was spent waiting
        self.assertIn("2 requests per 10 s", str(caught.exception))

    def test_buckets_are_keyed_as_okx_counts(self):
        limiter = plugin.RateLimiter(self.clock)
        order = limiter.bucket("POST", "/api/v5/trade/order", "key1", {"instId": "BTC-USDT"})
        self.assertEqual(order, ("POST", "/api/v5/trade/order", "key1", "BTC-USDT"))
        self.assertNotEqual(order, limiter.bucket("POST", "/api/v5/trade/order", "key1", {"instId": "ETH-USDT"}))
        self.assertEqual(limiter.bucket("GET", "/api/v5/market/ticker", "key1", {"instId": "BTC-USDT"}),
                         ("GET", "/api/v5/market/ticker"))
        self.assertEqual(limiter.bucket("GET", "/api/v5/account/balance", "key2", {}),
                         ("GET", "/api/v5/account/balance", "key2"))
        self.assertIsNone(limiter.bucket("GET", "/api/v5/unknown", "key1", {}))

    def test_call_that_cannot_wait_is_refused_without_calling_okx(self):
        server = self.start_plugin(timeout=1.0)
        docker = Docker(server.server_address[1])
        self.addCleanup(docker.close)
        for _ in range(10):
            self.assertIn("data", docker.call("accounts"))
        self.fake.clear_requests()
        error = docker.call("accounts")["error"]
        self.assertIn("10 requests per 2 s", error)
        self.assertIn("OKX was not called", error)
        self.assertEqual(self.okx_calls("/api/v5/account/balance"), [])

    def test_many_robots_on_one_key_never_see_50011(self):
        # OKX (the fake) counts each request in its windows when it arrives, on the same clock as the
        # plugin; the lockstep clock lets time pass only while every robot waits, never while a request
        # is on its way, so 2.5 s of OKX's windows pass in a fraction of a second.
        self.clock = LockstepClock()
        self.fake = FakeOKX(clock=self.clock).start()
        self.addCleanup(self.fake.stop)
        self.fake.enforce_rate_limits = True
        self.fake.set_balance("USDT", "100000")
        port = self.start_plugin(timeout=6.0).server_address[1]
        answers, durations = [], []
        started = self.clock.monotonic()

        def call(docker, method, params):
            with self.clock.busy():
                began = self.clock.monotonic()
                answer = docker.call(method, params)
                return answer, self.clock.monotonic() - began

        def robot(n):
            docker = Docker(port)
            calls = [("ticker", {"symbol": "BTC_USDT"}), ("accounts", {}),
                     ("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "20000", "amount": "0.00001"})]
            while self.clock.monotonic() < started + 2.5:
                answer, took = call(docker, *calls[n % 3])
                answers.append(answer)
                durations.append(took)
            docker.close()
        robots = [threading.Thread(target=robot, args=(n,)) for n in range(8)]
        for thread in robots:
            thread.start()
        self.assertTrue(wait_for(lambda: self.clock.monotonic() >= started + 1.0, timeout=10))
        other = Docker(port)                      # a robot on an endpoint nobody else uses
        self.assertIn("data", call(other, "depth", {"symbol": "ETH_USDT", "limit": 5})[0])
        other_latency = call(other, "depth", {"symbol": "ETH_USDT", "limit": 5})[1]
        other.close()
        for thread in robots:
            thread.join()
        errors = [answer["error"] for answer in answers if "error" in answer]
        self.assertEqual(errors, [])
        self.assertEqual(self.fake.rate_limited, 0)
        self.assertLess(max(durations), 6.0)
        self.assertGreater(max(durations), 0.1)   # the busy buckets did make robots wait
        self.assertLess(other_latency, 0.1)       # but never one whose bucket has room
        self.assertGreater(len(answers), 40)

    def test_okx_50011_backs_off_and_retries_once(self):
        self.fake.fault("/api/v5/account/balance", "ratelimit", count=1)
        self.assertIn("data", self.docker.call("accounts"))
        self.assertEqual(len(self.okx_calls("/api/v5/account/balance")), 2)


class ErrorHintTest(PluginTestCase):
    """OKX's code and message are kept, with the likely cause and what to do."""

    def test_every_hinted_code_carries_its_hint(self):
        for code, hint in plugin.ERROR_HINTS.items():
            text = str(plugin.ExchangeError(code, "message from OKX", 401, "/api/v5/account/balance"))
            self.assertTrue(text.startswith("OKX %s: message from OKX" % code), text)
            self.assertIn(hint.format(path="/api/v5/account/balance", limit=" (10 requests per 2 s)"), text)

    def test_site_hints_name_the_api_base(self):
        for code in ("50119", "50111"):
            text = str(plugin.ExchangeError(code, "x"))
            self.assertIn("--api-base https://eea.okx.com", text)
            self.assertIn("us.okx.com", text)

    def test_rate_limit_hint_names_the_endpoint_and_its_limit(self):
        text = str(plugin.ExchangeError("50011", "Too Many Requests", 429, "/api/v5/market/ticker"))
        self.assertIn("/api/v5/market/ticker (20 requests per 2 s)", text)

    def test_wrong_key_and_passphrase_through_the_plugin(self):
        self.assertIn("Access Key", self.error("accounts", access_key="no-such-key"))
        error = self.error("accounts", secret_key=SECRET + ",wrong-passphrase")
        self.assertIn("OKX 50105", error)
        self.assertIn("passphrase", error)
        self.assertNotIn("wrong-passphrase", error)

    def test_version_flag(self):
        out = subprocess.run([sys.executable, os.path.join(HERE, "fmz_custom_protocol.py"), "--version"],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0)
        self.assertEqual(out.stdout.strip(), "fmz_custom_protocol.py " + plugin.__version__)


# ---- Live market stream ----

class _WSClient:
    """Minimal RFC 6455 client for the self-tests: masked frames, no TLS, no extensions."""

    def __init__(self, url: str, path: str = PUBLIC_PATH, timeout: float = 2.0):
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._buffer = b""
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n" % (path, host, port, key)).encode())
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {n.strip().lower(): v.strip() for n, _, v in (l.partition(":") for l in lines[1:])}
        self.accept_ok = self.headers.get("sec-websocket-accept") == websocket_accept(key)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self._buffer += chunk

    def _recv_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True, masked: bool = True):
        self.sock.sendall(encode_frame(opcode, payload, fin, os.urandom(4) if masked else None))

    def send_json(self, message: dict) -> None:
        self.send_frame(OP_TEXT, json.dumps(message).encode())

    def recv_frame(self):
        """``(opcode, payload)`` of the next server frame (server frames are never masked)."""
        first, second = self._recv_exact(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._recv_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._recv_exact(8))[0]
        return first & 0x0F, self._recv_exact(length)

    def recv_json(self) -> dict:
        opcode, payload = self.recv_frame()
        assert opcode == OP_TEXT, opcode
        return json.loads(payload.decode("utf-8"))

    def close(self) -> None:
        self.sock.close()


class FakeStreamSelfTest(unittest.TestCase):
    """The fake speaks RFC 6455 and OKX's public-stream rules (OKX's v5 docs)."""

    def setUp(self):
        self.clock = VirtualClock()
        self.okx = FakeOKXStream(clock=self.clock).start()
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.okx.stop()

    def connect(self, **kwargs) -> _WSClient:
        client = _WSClient(self.okx.url, **kwargs)
        self.clients.append(client)
        return client

    def subscribe(self, client, channel, inst_id="BTC-USDT") -> dict:
        client.send_json({"id": "7", "op": "subscribe", "args": [{"channel": channel, "instId": inst_id}]})
        ack = client.recv_json()
        self.assertEqual(ack, {"id": "7", "event": "subscribe",
                               "arg": {"channel": channel, "instId": inst_id}, "connId": ack["connId"]})
        return ack

    def test_handshake_accept_value(self):
        self.assertEqual(websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        client = self.connect()
        self.assertEqual((client.status, client.accept_ok), (101, True))
        self.assertEqual((self.okx.connections_total, self.okx.open_connections), (1, 1))
        self.okx.bad_accept = True
        self.assertFalse(self.connect().accept_ok)
        self.assertEqual(self.connect(path="/ws/v5/private").status, 404)

    def test_subscribe_ack_ticker_push_and_errors(self):
        client = self.connect()
        self.subscribe(client, "tickers")
        push = client.recv_json()
        self.assertEqual(push["arg"], {"channel": "tickers", "instId": "BTC-USDT"})
        row = push["data"][0]
        self.assertEqual((row["instType"], row["last"], row["bidPx"], row["askPx"]),
                         ("SPOT", "43000", "43000", "43000.1"))
        self.okx.set_ticker("BTC-USDT", last="43010.5")
        self.assertEqual(client.recv_json()["data"][0]["last"], "43010.5")
        self.assertEqual(self.okx.subscriptions(), {("tickers", "BTC-USDT")})
        client.send_json({"op": "subscribe", "args": [{"channel": "tickers", "instId": "XYZ-USDT"}]})
        error = client.recv_json()
        self.assertEqual((error["event"], error["code"], "id" in error), ("error", "60018", False))
        client.send_frame(OP_TEXT, b"{nope")
        self.assertEqual(client.recv_json()["code"], "60012")
        client.send_json({"id": "8", "op": "login", "args": []})
        self.assertEqual(client.recv_json()["code"], "60019")

    def test_books_snapshot_checksum_is_correct(self):
        client = self.connect()
        self.subscribe(client, "books")
        snapshot = client.recv_json()
        self.assertEqual(snapshot["action"], "snapshot")
        data = snapshot["data"][0]
        self.assertEqual(data["prevSeqId"], -1)
        self.assertGreaterEqual(min(len(data["bids"]), len(data["asks"])), 50)
        self.assertEqual(data["checksum"], okx_book_checksum(data["bids"], data["asks"]))
        self.assertNotEqual(data["checksum"], 0)

    def test_set_level_update_chains_seq_id(self):
        client = self.connect()
        self.subscribe(client, "books")
        snapshot = client.recv_json()["data"][0]
        self.subscribe(client, "books5")
        self.assertEqual(len(client.recv_json()["data"][0]["bids"]), 5)
        self.okx.set_level("BTC-USDT", "bids", "43000", "9")
        update = client.recv_json()
        data = update["data"][0]
        self.assertEqual(update["action"], "update")
        self.assertEqual((data["bids"], data["asks"]), ([["43000", "9", "0", "1"]], []))
        self.assertEqual(data["prevSeqId"], snapshot["seqId"])
        self.assertIn(data["seqId"] - snapshot["seqId"], range(1, 6))
        bids = {row[0]: row[1] for row in snapshot["bids"]}
        bids["43000"] = "9"
        bid_rows = sorted(bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        self.assertEqual(data["checksum"], okx_book_checksum(bid_rows, snapshot["asks"]))
        books5 = client.recv_json()["data"][0]
        self.assertEqual((books5["bids"][0], books5["seqId"]), (["43000", "9", "0", "1"], data["seqId"]))

    def test_sequence_exceptions(self):
        client = self.connect()
        self.subscribe(client, "books", "ETH-USDT")
        last = client.recv_json()["data"][0]["seqId"]
        beat = self.okx.send_heartbeat("ETH-USDT")
        self.assertEqual((beat["prevSeqId"], beat["seqId"], beat["bids"]), (last, last, []))
        reset = self.okx.send_reset("ETH-USDT", 3)
        self.assertEqual((reset["prevSeqId"], reset["seqId"]), (last, 3))
        gap = self.okx.send_gap("ETH-USDT")
        self.assertGreater(gap["prevSeqId"], 3)
        bad = self.okx.send_bad_checksum("ETH-USDT")
        self.assertEqual(bad["prevSeqId"], gap["seqId"])
        bids, asks = self.okx.book("ETH-USDT")
        self.assertNotIn(bad["checksum"], (0, okx_book_checksum(bids, asks)))
        self.assertEqual([client.recv_json()["data"][0]["seqId"] for _ in range(4)],
                         [last, 3, gap["seqId"], bad["seqId"]])

    def test_text_ping_and_ping_frame(self):
        client = self.connect()
        client.send_frame(OP_TEXT, b"pi", fin=False)
        client.send_frame(OP_PING, b"x")                 # control frame between fragments
        client.send_frame(OP_CONT, b"ng")
        self.assertEqual(client.recv_frame(), (OP_PONG, b"x"))
        self.assertEqual(client.recv_frame(), (OP_TEXT, b"pong"))
        self.assertEqual((self.okx.pings_received, self.okx.received), (1, ["ping"]))

    def test_silent_mode(self):
        client = self.connect()
        self.subscribe(client, "tickers")
        client.recv_json()
        self.okx.answer_pings = False
        client.sock.settimeout(0.3)
        client.send_frame(OP_TEXT, b"ping")
        self.okx.set_ticker("BTC-USDT", last="1")
        with self.assertRaises(socket.timeout):
            client.recv_frame()
        self.assertEqual(self.okx.pings_received, 1)

    def test_kill_and_close(self):
        first, second = self.connect(), self.connect()
        self.okx.kill_connections()
        with self.assertRaises(ConnectionError):
            first.recv_frame()
        self.assertEqual(self.okx.open_connections, 0)
        third = self.connect()
        self.okx.close_connections(4004)
        self.assertEqual(third.recv_frame(), (OP_CLOSE, struct.pack("!H", 4004)))
        self.okx.idle_close_s = 30
        fourth = self.connect()
        self.clock.advance(30.5)
        self.assertEqual(fourth.recv_frame(),
                         (OP_CLOSE, struct.pack("!H", 4004) + b"No data received in 30s"))

    def test_unmasked_frame_closes_1002(self):
        client = self.connect()
        client.send_frame(OP_TEXT, b"ping", masked=False)
        opcode, payload = client.recv_frame()
        self.assertEqual((opcode, struct.unpack("!H", payload[:2])[0]), (OP_CLOSE, 1002))

    def test_notice_64008(self):
        client = self.connect()
        self.okx.send_notice_64008()
        notice = client.recv_json()
        self.assertEqual((notice["event"], notice["code"], notice["msg"]),
                         ("notice", "64008", NOTICE_64008_MSG))
        self.assertEqual(len(notice["connId"]), 8)

    def test_checksum_worked_examples(self):
        self.assertEqual(okx_book_checksum([["3366.1", "7"]],
                                           [["3366.8", "9"], ["3368", "8"], ["3372", "8"]]), 831078360)
        self.assertEqual(okx_book_checksum([["3366.1", "7"], ["3366", "6"]],
                                           [["3366.8", "9"], ["3368", "8"]]), -1881014294)


class VirtualClockSelfTest(unittest.TestCase):
    """VirtualClock on its own, and the fakes reading it (REST rules, the stream's ts and idle rule)."""

    def start_waiter(self, clock, event, timeout):
        """wait() in a thread; returns (thread, result list that gets wait()'s answer)."""
        result = []
        thread = threading.Thread(target=lambda: result.append(clock.wait(event, timeout)), daemon=True)
        thread.start()
        return thread, result

    def test_sleep_moves_every_clock_at_once(self):
        clock = VirtualClock()
        start, true_start, wall_start = clock.monotonic(), clock.true_time(), clock.time()
        self.assertEqual(start, 10000.0)
        self.assertLess(abs(true_start - time.time()), 5)
        began = time.monotonic()
        clock.sleep(3600)
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertEqual(clock.monotonic(), start + 3600)
        self.assertAlmostEqual(clock.true_time(), true_start + 3600, places=5)
        self.assertAlmostEqual(clock.time(), wall_start + 3600, places=5)
        clock.sleep(-5)
        clock.sleep(0)
        self.assertEqual(clock.monotonic(), start + 3600)
        with self.assertRaises(ValueError):
            clock.advance(-1)

    def test_wait_returns_when_the_event_is_set_without_moving_time(self):
        clock, event = VirtualClock(), threading.Event()
        thread, result = self.start_waiter(clock, event, 30)
        self.assertTrue(wait_for(lambda: clock.waiting() == [10030.0]))    # parked until its deadline
        self.assertEqual(result, [])
        event.set()
        thread.join(1)
        self.assertEqual((result, clock.monotonic()), ([True], 10000.0))
        self.assertTrue(clock.wait(event, None))
        self.assertFalse(clock.wait(threading.Event(), 0))

    def test_wait_times_out_only_when_virtual_time_reaches_its_deadline(self):
        clock, event = VirtualClock(), threading.Event()
        thread, result = self.start_waiter(clock, event, 5)
        self.assertTrue(wait_for(lambda: clock.waiting() == [10005.0]))
        time.sleep(0.05)                                  # far longer than its poll slice: still waiting
        clock.advance(4)
        time.sleep(0.05)
        self.assertEqual((result, clock.monotonic(), clock.waiting()), ([], 10004.0, [10005.0]))
        clock.advance(1)
        thread.join(1)
        self.assertEqual(result, [False])
        thread, result = self.start_waiter(clock, event, 3)    # another thread's sleep ends it too
        self.assertTrue(wait_for(lambda: clock.waiting() == [10008.0]))
        clock.sleep(3)
        thread.join(1)
        self.assertEqual((result, clock.monotonic()), ([False], 10008.0))

    def test_step_wall_moves_only_the_host_wall_clock(self):
        clock = VirtualClock()
        start, true_start, wall_start = clock.monotonic(), clock.true_time(), clock.time()
        self.assertEqual(wall_start, true_start)
        clock.step_wall(-40)
        self.assertEqual((clock.monotonic(), clock.true_time(), clock.time()), (start, true_start, wall_start - 40))
        clock.advance(2)
        self.assertEqual(clock.monotonic(), start + 2)
        self.assertAlmostEqual(clock.true_time(), true_start + 2, places=5)
        self.assertAlmostEqual(clock.time(), wall_start - 38, places=5)

    def test_real_clock_is_the_machine_clock(self):
        event = threading.Event()
        self.assertLess(abs(REAL_CLOCK.true_time() - time.time()), 1)
        self.assertLess(abs(REAL_CLOCK.time() - time.time()), 1)
        self.assertLess(abs(REAL_CLOCK.monotonic() - time.monotonic()), 1)
        self.assertFalse(REAL_CLOCK.wait(event, 0.01))
        event.set()
        self.assertTrue(REAL_CLOCK.wait(event, 5))

    def test_fake_okx_keeps_its_own_time_on_the_clock(self):
        clock = VirtualClock()
        fake = FakeOKX(clock=clock).start()
        self.addCleanup(fake.stop)
        clock.advance(3600)                        # an hour ahead of the real clock
        _, answer = okx_request(fake.base_url, "GET", "/api/v5/public/time", signed=False)
        self.assertEqual(int(answer["data"][0]["ts"]), int(clock.true_time() * 1000))
        self.assertEqual(fake.now_ms(), int(clock.true_time() * 1000))
        clock.step_wall(40)                        # the host's clock jumps; OKX's does not
        status, answer = okx_request(fake.base_url, "GET", "/api/v5/account/config",
                                     timestamp=okx_timestamp(int(clock.time() * 1000)))
        self.assertEqual((status, answer["code"]), (401, "50102"))
        status, answer = okx_request(fake.base_url, "GET", "/api/v5/account/config",
                                     timestamp=okx_timestamp(fake.now_ms()))
        self.assertEqual((status, answer["code"]), (200, "0"))
        order = {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000",
                 "sz": "0.01"}
        stamp = okx_timestamp(fake.now_ms())
        _, late = okx_request(fake.base_url, "POST", "/api/v5/trade/order", order, timestamp=stamp,
                              headers={"expTime": str(fake.now_ms() - 1000)})   # past for OKX, future for us
        self.assertEqual(late["data"][0]["sCode"], "50037")
        _, placed = okx_request(fake.base_url, "POST", "/api/v5/trade/order", order, timestamp=stamp,
                                headers={"expTime": str(fake.now_ms() + 5000)})
        self.assertEqual(placed["data"][0]["sCode"], "0")
        self.assertEqual(fake.orders()[0]["cTime"], str(fake.now_ms()))
        self.assertEqual(int(placed["inTime"]) // 1000, fake.now_ms())

    def test_rate_limit_windows_run_on_the_clock(self):
        clock = VirtualClock()
        fake = FakeOKX(clock=clock).start()
        self.addCleanup(fake.stop)
        fake.enforce_rate_limits = True
        statuses = [okx_request(fake.base_url, "GET", "/api/v5/public/time", signed=False)[0] for _ in range(11)]
        self.assertEqual(statuses, [200] * 10 + [429])
        time.sleep(0.1)
        self.assertEqual(okx_request(fake.base_url, "GET", "/api/v5/public/time", signed=False)[0], 429)
        clock.advance(2)
        self.assertEqual(okx_request(fake.base_url, "GET", "/api/v5/public/time", signed=False)[0], 200)

    def test_stream_stamps_and_idle_rule_follow_the_clock(self):
        clock = VirtualClock()
        stream = FakeOKXStream(clock=clock).start()
        self.addCleanup(stream.stop)
        client = _WSClient(stream.url)
        self.addCleanup(client.close)
        client.send_json({"op": "subscribe", "args": [{"channel": "tickers", "instId": "BTC-USDT"}]})
        client.recv_json()
        self.assertEqual(client.recv_json()["data"][0]["ts"], str(int(clock.true_time() * 1000)))
        clock.advance(90)
        self.assertEqual(stream.set_ticker("BTC-USDT", last="1")["ts"], str(int(clock.true_time() * 1000)))
        client.recv_json()
        stream.idle_close_s = 30
        client.sock.settimeout(0.3)
        client.send_frame(OP_TEXT, b"ping")
        self.assertEqual(client.recv_frame(), (OP_TEXT, b"pong"))
        with self.assertRaises(socket.timeout):       # real time passes, virtual time does not
            client.recv_frame()
        clock.advance(31)
        client.sock.settimeout(2)
        self.assertEqual(client.recv_frame(), (OP_CLOSE, struct.pack("!H", 4004) + b"No data received in 30s"))


class FakePrivateStreamSelfTest(unittest.TestCase):
    """The fake's /ws/v5/private (OKX's v5 docs): login, channels, pushes that follow REST, knobs."""

    ALL = [{"channel": "account"}, {"channel": "positions", "instType": "ANY"},
           {"channel": "orders", "instType": "ANY"}]

    def setUp(self):
        self.clock = VirtualClock()                  # frozen unless a test moves it: exact stamps
        self.fake = FakeOKX(clock=self.clock).start()
        self.addCleanup(self.fake.stop)
        self.okx = self.start_stream()

    def start_stream(self, **options) -> FakeOKXStream:
        stream = FakeOKXStream(okx=self.fake, **options).start()
        self.addCleanup(stream.stop)
        return stream

    def connect(self, stream=None, path=PRIVATE_PATH) -> _WSClient:
        client = _WSClient((stream or self.okx).url, path=path)
        self.addCleanup(client.close)
        return client

    def stamp(self):
        return str(self.fake.now_ms() // 1000)

    def login(self, client, key=KEY, **options) -> dict:
        options.setdefault("timestamp", self.stamp())
        client.send_json(ws_login_request(key, **options))
        return client.recv_json()

    def subscribe(self, client, args, snapshots=True) -> list:
        """Subscribe `args` in one request; check the ack + channel-conn-count pairs; return the snapshots."""
        client.send_json({"id": "s1", "op": "subscribe", "args": args})
        for arg in args:
            ack, count = client.recv_json(), client.recv_json()
            self.assertEqual(ack, {"id": "s1", "event": "subscribe", "arg": arg, "connId": ack["connId"]})
            self.assertEqual((count["event"], count["channel"], count["connId"]),
                             ("channel-conn-count", arg["channel"], ack["connId"]))
        wanted = [arg for arg in args if arg["channel"] != "orders"] if snapshots else []
        return [client.recv_json() for _ in wanted]

    def logged_in(self, args=None, key=KEY, stream=None) -> _WSClient:
        client = self.connect(stream)
        self.assertEqual(self.login(client, key)["code"], "0")
        self.subscribe(client, self.ALL if args is None else args)
        return client

    def assert_quiet(self, client, seconds=0.2):
        """Nothing more comes to ``client`` now: every push that is due has left the fake's outbox, and a
        ping sent after that is answered before anything else. (A silent fake answers no ping: then
        nothing may come for ``seconds``.)"""
        if self.okx.answer_pings:
            def all_due_sent():
                with self.okx._lock:
                    now = self.okx.clock.monotonic()
                    return not any(entry[0] is None or entry[0] <= now for entry in self.okx._outbox)
            self.assertTrue(wait_for(all_due_sent))
            with self.okx._deliver_lock:              # a delivery under way has been written
                pass
            client.send_frame(OP_TEXT, b"ping")
            self.assertEqual(client.recv_frame(), (OP_TEXT, b"pong"))
            return
        client.sock.settimeout(seconds)
        with self.assertRaises(socket.timeout):
            client.recv_frame()
        client.sock.settimeout(2)

    def rest(self, method, path, body=None, key=KEY, **options):
        status, answer = okx_request(self.fake.base_url, method, path, body, key=key,
                                     timestamp=okx_timestamp(self.fake.now_ms()), **options)
        self.assertEqual((status, answer["code"]), (200, "0"), answer)
        return answer["data"]

    def place(self, key=KEY, secret=None, passphrase=None, **order):
        order = dict({"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit", "px": "30000",
                      "sz": "0.01"}, **order)
        row = self.rest("POST", "/api/v5/trade/order", order, key=key, secret=secret, passphrase=passphrase)[0]
        self.assertEqual(row["sCode"], "0", row)
        return row["ordId"]

    def test_login_sign_matches_the_worked_example(self):
        secret = "22582BD0CFF14C41EDBF1AB98506286D"
        self.assertEqual(ws_login_sign(secret, "1704876947"), "5/36BgGV6m/6pmdc20zdqk0mzF5ZalmzzPD2fo3wavU=")
        self.assertEqual(ws_login_sign(secret, 1795512600), "iWDCjR8RtbNDzQ5qaVlj/0BNRo4mJ4G0kwOrFyoDh7Q=")

    def test_each_login_refusal_has_okx_code_and_the_connection_stays_open(self):
        now = int(self.stamp())
        good = ws_login_request(KEY, timestamp=str(now))["args"][0]
        cases = [
            ({"op": "login", "args": []}, "60012"),
            ({"op": "login", "args": [good, good]}, "60012"),
            ({"op": "login", "args": [dict(good, sign="")]}, "60012"),
            ({"op": "login", "args": [{k: v for k, v in good.items() if k != "timestamp"}]}, "60012"),
            (ws_login_request(KEY, timestamp="%d.5" % now), "60004"),
            (ws_login_request(KEY, timestamp="soon"), "60004"),
            (ws_login_request(KEY, timestamp=str(now - 31)), "60006"),
            (ws_login_request(KEY, timestamp=str(now + 31)), "60006"),
            (ws_login_request(KEY, timestamp=str(now * 1000)), "60006"),
            (ws_login_request("9a8b7c6d-0000-4000-8000-000000000000", secret="X", passphrase="Y",
                              timestamp=str(now)), "60032"),
            (ws_login_request(DEMO_KEY, timestamp=str(now)), "50101"),
            (ws_login_request(KEY, passphrase="wrong", timestamp=str(now)), "60024"),
            (ws_login_request(KEY, secret="not-the-secret", timestamp=str(now)), "60007"),
        ]
        client = self.connect()
        for request, code in cases:
            client.send_json(request)
            answer = client.recv_json()
            self.assertEqual((answer["event"], answer["code"]), ("error", code), request)
            self.assertEqual(len(answer["connId"]), 8)
        self.assertEqual(answer["msg"], "Invalid sign")
        client.send_frame(OP_TEXT, b"ping")
        self.assertEqual(client.recv_frame(), (OP_TEXT, b"pong"))
        client.send_json(ws_login_request(KEY, timestamp=now - 29))          # a JSON integer is taken too
        self.assertEqual(client.recv_json(), {"event": "login", "code": "0", "msg": "", "connId": answer["connId"]})
        client.send_json(ws_login_request(KEY, timestamp=str(now)))
        self.assertEqual(client.recv_json()["code"], "60031")
        self.assertEqual(self.okx.logins, [(key, code) for key, code in
                                           [("", "60012"), (KEY, "60012"), (KEY, "60012"), (KEY, "60012")]
                                           + [(r["args"][0]["apiKey"], c) for r, c in cases[4:]]
                                           + [(KEY, "0"), (KEY, "60031")]])
        self.assertEqual(self.okx.open_private_connections, 1)

    def test_demo_host_takes_only_demo_keys_and_refuse_logins_refuses_all(self):
        demo = self.start_stream(demo=True)
        self.assertEqual(self.login(self.connect(demo), KEY)["code"], "50101")
        self.assertEqual(self.login(self.connect(demo), DEMO_KEY)["code"], "0")
        self.okx.refuse_logins = "63999"
        answer = self.login(self.connect(), KEY)
        self.assertEqual((answer["event"], answer["code"], answer["msg"]), ("error", "63999", LOGIN_ERRORS["63999"]))

    def test_subscribe_needs_a_login_and_known_channels(self):
        client = self.connect()
        client.send_json({"id": "a1", "op": "subscribe", "args": [{"channel": "account"}]})
        error = client.recv_json()
        self.assertEqual((error["id"], error["event"], error["code"], error["msg"]),
                         ("a1", "error", "60011", "Please log in"))
        self.login(client)
        for arg, code in (({"channel": "balance"}, "60018"), ({"channel": "positions"}, "60012"),
                          ({"channel": "positions", "instType": "SPOT"}, "60012"), ({"channel": "orders"}, "60012")):
            client.send_json({"op": "subscribe", "args": [arg]})
            self.assertEqual(client.recv_json()["code"], code, arg)
        self.subscribe(client, [{"channel": "orders", "instType": "SPOT"}])
        self.assertEqual(self.okx.private_subscriptions(), {KEY: [{"channel": "orders", "instType": "SPOT"}]})
        client.send_json({"op": "unsubscribe", "args": [{"channel": "orders", "instType": "SPOT"}]})
        ack = client.recv_json()
        self.assertEqual((ack["event"], ack["arg"]), ("unsubscribe", {"channel": "orders", "instType": "SPOT"}))
        self.assertEqual(self.okx.private_subscriptions(KEY), [])
        self.assertEqual(self.connect(path="/ws/v5/business").status, 404)
        public = self.connect(path=PUBLIC_PATH)
        public.send_json({"op": "subscribe", "args": [{"channel": "tickers", "instId": "BTC-USDT"}]})
        self.assertEqual(public.recv_json()["event"], "subscribe")

    def test_snapshots_on_subscribe_are_the_rest_rows(self):
        self.place(instId="BTC-USDT-SWAP", tdMode="cross", ordType="market", sz="2")
        self.place()
        client = self.connect()
        self.login(client)
        account, positions = self.subscribe(client, self.ALL)
        uid = self.fake.accounts[KEY]["uid"]
        self.assertEqual(account, {"arg": {"channel": "account", "uid": uid}, "eventType": "snapshot", "curPage": 1,
                                   "lastPage": True, "data": self.rest("GET", "/api/v5/account/balance")})
        rows = [dict(row, pTime=str(self.fake.now_ms())) for row in self.rest("GET", "/api/v5/account/positions")]
        self.assertEqual(positions, {"arg": {"channel": "positions", "instType": "ANY", "uid": uid},
                                     "eventType": "snapshot", "curPage": 1, "lastPage": True, "data": rows})
        self.assertEqual(rows[0]["pos"], "2")
        self.assert_quiet(client)                                  # orders: nothing on subscribe
        self.assertEqual(self.subscribe(client, [{"channel": "positions", "instType": "FUTURES"}])[0]["data"], [])
        only_btc = self.subscribe(client, [{"channel": "account", "ccy": "BTC"}])[0]["data"][0]["details"]
        self.assertEqual([row["ccy"] for row in only_btc], ["BTC"])

    def test_limit_order_pushes_live_and_a_fill_pushes_orders_account_positions(self):
        client = self.logged_in()
        ord_id = self.place(clOrdId="push1")
        live = client.recv_json()
        self.assertEqual(live["arg"], {"channel": "orders", "instType": "ANY", "uid": self.fake.accounts[KEY]["uid"]})
        self.assertNotIn("eventType", live)
        row = live["data"][0]
        self.assertEqual((row["ordId"], row["clOrdId"], row["state"], row["px"], row["sz"], row["accFillSz"]),
                         (ord_id, "push1", "live", "30000", "0.01", "0"))
        self.assertEqual({name: row[name] for name in _NO_FILL}, _NO_FILL)
        self.assertEqual((row["avgPx"], row["amendResult"], row["reqId"], row["code"], row["msg"]),
                         ("0", "", "", "0", ""))
        self.assertEqual((row["cTime"], row["uTime"]), (str(self.fake.now_ms()),) * 2)
        frozen = client.recv_json()
        self.assertEqual(frozen["eventType"], "event_update")
        self.assertEqual([(d["ccy"], d["availBal"], d["frozenBal"]) for d in frozen["data"][0]["details"]],
                         [("USDT", "9700", "300")])
        self.assertNotIn("curPage", frozen)
        self.clock.advance(1)
        self.fake.fill(ord_id)
        filled = client.recv_json()["data"][0]
        self.assertEqual((filled["state"], filled["fillSz"], filled["fillPx"], filled["accFillSz"], filled["avgPx"]),
                         ("filled", "0.01", "30000", "0.01", "30000"))
        self.assertEqual((filled["fillFee"], filled["fillFeeCcy"], filled["execType"], filled["fillTime"]),
                         ("-0.00001", "BTC", "M", str(self.fake.now_ms())))
        self.assertTrue(filled["tradeId"])
        balances = client.recv_json()["data"][0]["details"]
        self.assertEqual([(d["ccy"], d["cashBal"], d["frozenBal"]) for d in balances],
                         [("BTC", "0.50999", "0"), ("USDT", "9700", "0")])
        self.assert_quiet(client)                                  # a spot fill moves no position

    def test_market_order_pushes_accepted_then_filled_and_a_closed_position_pos_0(self):
        client = self.logged_in()
        self.place(instId="BTC-USDT-SWAP", tdMode="cross", ordType="market", sz="2")
        accepted, filled = client.recv_json()["data"][0], client.recv_json()["data"][0]
        self.assertEqual((accepted["state"], accepted["fillSz"], accepted["avgPx"]), ("live", "0", "0"))
        self.assertEqual((filled["state"], filled["fillSz"], filled["execType"], filled["fillFeeCcy"]),
                         ("filled", "2", "T", "USDT"))
        self.assertEqual(client.recv_json()["arg"]["channel"], "account")
        opened = client.recv_json()
        self.assertEqual((opened["arg"]["channel"], opened["eventType"]), ("positions", "event_update"))
        self.assertEqual([(p["instId"], p["pos"], p["pTime"]) for p in opened["data"]],
                         [("BTC-USDT-SWAP", "2", str(self.fake.now_ms()))])
        self.clock.advance(1)
        self.place(instId="BTC-USDT-SWAP", tdMode="cross", side="sell", ordType="market", sz="2", reduceOnly=True)
        self.assertEqual([client.recv_json()["data"][0]["state"] for _ in range(2)], ["live", "filled"])
        self.assertEqual(client.recv_json()["arg"]["channel"], "account")
        closed = client.recv_json()["data"]
        self.assertEqual([(p["posId"], p["pos"]) for p in closed], [(opened["data"][0]["posId"], "0")])
        self.assertEqual(self.rest("GET", "/api/v5/account/positions"), [])
        self.okx.push_snapshots()
        self.assertEqual(client.recv_json()["eventType"], "snapshot")
        later = client.recv_json()
        self.assertEqual((later["arg"]["channel"], later["eventType"], later["data"]), ("positions", "snapshot", []))

    def test_cancel_pushes_canceled_and_helpers_push_balances(self):
        client = self.logged_in()
        ord_id = self.place()
        client.recv_json(), client.recv_json()
        self.rest("POST", "/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": ord_id})
        canceled = client.recv_json()["data"][0]
        self.assertEqual((canceled["ordId"], canceled["state"], canceled["fillSz"], canceled["execType"]),
                         (ord_id, "canceled", "0", ""))
        self.assertEqual([d["availBal"] for d in client.recv_json()["data"][0]["details"]], ["10000"])
        self.fake.set_balance("ETH", "7")
        self.assertEqual([(d["ccy"], d["cashBal"]) for d in client.recv_json()["data"][0]["details"]], [("ETH", "7")])
        self.fake.set_balance("ETH", "0")
        self.assertEqual([(d["ccy"], d["cashBal"], d["eq"]) for d in client.recv_json()["data"][0]["details"]],
                         [("ETH", "0", "0")])
        self.fake.set_position_mode("long_short_mode")        # nothing an account stream shows
        self.assert_quiet(client)
        self.place(ordType="ioc")                             # rests nowhere: accepted, then canceled at once
        self.assertEqual([client.recv_json()["data"][0]["state"] for _ in range(2)], ["live", "canceled"])

    def test_subscription_filters_decide_what_is_pushed(self):
        client = self.logged_in([{"channel": "orders", "instType": "SWAP"}, {"channel": "account", "ccy": "BTC"}])
        self.place()                                          # spot, and it freezes USDT only
        self.assert_quiet(client)
        self.place(instId="BTC-USDT-SWAP", tdMode="cross", px="30000", sz="1")
        self.assertEqual(client.recv_json()["data"][0]["instId"], "BTC-USDT-SWAP")
        self.assert_quiet(client)

    def test_push_delay_holds_pushes_until_the_clock_reaches_them(self):
        client = self.logged_in()
        self.okx.push_delay_s = 5
        ord_id = self.place()
        self.fake.fill(ord_id)
        self.assert_quiet(client)
        self.clock.advance(4.9)
        self.assert_quiet(client)
        self.clock.advance(0.1)
        self.assertEqual([(m["arg"]["channel"], m["data"][0].get("state")) for m in
                          (client.recv_json() for _ in range(4))],
                         [("orders", "live"), ("account", None), ("orders", "filled"), ("account", None)])

    def test_duplicate_pushes_repeat_orders_with_a_later_utime(self):
        client = self.logged_in()
        self.okx.duplicate_pushes = True
        self.place()
        first, second = client.recv_json()["data"][0], client.recv_json()["data"][0]
        self.assertEqual(dict(second, uTime=first["uTime"]), first)
        self.assertEqual(int(second["uTime"]), int(first["uTime"]) + 1)
        self.assertEqual(client.recv_json()["arg"]["channel"], "account")
        self.assert_quiet(client)

    def test_push_before_answer_writes_the_push_before_the_rest_answer(self):
        client = self.logged_in()
        self.okx.push_before_answer = True
        answered = []
        thread = threading.Thread(target=lambda: answered.append((self.place(), time.monotonic())), daemon=True)
        thread.start()
        push = client.recv_json()["data"][0]
        pushed_at = time.monotonic()
        thread.join(2)
        self.assertEqual(push["ordId"], answered[0][0])
        self.assertLess(pushed_at, answered[0][1])

    def test_silent_mode_sends_nothing(self):
        client = self.logged_in()
        self.okx.answer_pings = False
        client.send_frame(OP_TEXT, b"ping")
        self.place()
        self.assert_quiet(client)
        self.assertEqual(self.okx.pings_received, 1)

    def test_two_keys_on_two_connections_never_see_each_others_pushes(self):
        other = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
        self.fake.accounts[other] = new_account("5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B", "Other-Pass-1", False,
                                                "66927014565831706", LIVE_BALANCES)
        mine, theirs = self.logged_in(), self.connect()
        self.assertEqual(self.login(theirs, other, secret="5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B",
                                    passphrase="Other-Pass-1")["code"], "0")
        self.subscribe(theirs, self.ALL)
        second = self.connect()
        self.login(second)
        second.send_json({"op": "subscribe", "args": [{"channel": "orders", "instType": "ANY"}]})
        second.recv_json()
        self.assertEqual(second.recv_json()["connCount"], "2")          # two connections of KEY on orders
        self.place(clOrdId="mine1")
        self.assertEqual(mine.recv_json()["data"][0]["clOrdId"], "mine1")
        self.assert_quiet(theirs)
        self.place(clOrdId="theirs1", key=other, secret="5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B",
                   passphrase="Other-Pass-1")
        pushed = theirs.recv_json()
        self.assertEqual((pushed["data"][0]["clOrdId"], pushed["arg"]["uid"]), ("theirs1", "66927014565831706"))
        mine.recv_json()                                             # mine: its own account push, nothing else
        self.assert_quiet(mine)
        self.assertEqual(self.okx.open_private_connections, 3)
        self.okx.kill_connections()
        self.assertEqual(self.okx.open_private_connections, 0)


BTC, ETH = "BTC-USDT", "ETH-USDT"



def wait_for(probe, timeout=2.0, interval=0.01):
    """``probe()``'s first truthy value within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def quick_stream_threads(test):
    """Let the plugin's stream threads look at their sockets and stop flag every 10 ms instead of every
    STREAM_POLL (50 ms) for the rest of ``test``: a stream then closes in milliseconds. Real time only;
    every rule of the stream still follows its clock."""
    patcher = mock.patch.object(plugin, "STREAM_POLL", 0.01)
    patcher.start()
    test.addCleanup(patcher.stop)


class StreamTestCase(unittest.TestCase):
    """A fresh fake OKX stream and MarketStream per test, both on one VirtualClock (``self.clock``);
    both closed afterwards.

    The stream's thread turns in real time (its socket reads wait STREAM_POLL), but every rule it keeps
    (pings, freshness, giving up a silent connection, backoff, connections per second, idle
    subscriptions) reads the virtual clock: a test moves the clock to the moment it wants to see, and
    waits (in real time, briefly) for the thread to act on it. ``self.clock.waiting()`` shows where the
    thread is parked (a backoff, the connection limit).
    """

    idle_seconds = 300.0

    def setUp(self):
        plugin.LiveConnection._connect_times.clear()      # OKX's per-IP connection rate is not the fake's
        quick_stream_threads(self)
        self.clock = VirtualClock()
        self.okx = FakeOKXStream(clock=self.clock).start()
        self.addCleanup(self.okx.stop)
        self.market = self.make_stream()

    def make_stream(self, **options):
        options.setdefault("idle_seconds", self.idle_seconds)
        market = plugin.MarketStream(self.okx.url, self.clock, **options)
        self.addCleanup(market.close)
        return market

    def subscribe_requests(self):
        return [r for r in self.okx.received if isinstance(r, dict) and r.get("op") == "subscribe"]

    def synced_depth(self, inst_id, limit=400, market=None):
        """Ask for depth until memory answers it; fail if it never does."""
        market = market or self.market
        book = wait_for(lambda: market.depth(inst_id, limit))
        self.assertIsNotNone(book, "depth never came from memory")
        return book

    def assert_book_matches(self, inst_id, limit=400, market=None):
        """Memory's book equals the fake's, within a short wait for the push to land."""
        market = market or self.market
        bids, asks = self.okx.book(inst_id)
        expected = {"bids": bids[:limit], "asks": asks[:limit]}

        def same():
            book = market.depth(inst_id, limit)
            return book is not None and {side: [level[:2] for level in book[side]]
                                         for side in ("bids", "asks")} == expected
        self.assertTrue(wait_for(same), "memory's book differs from OKX's")


class AnswersFromMemoryTest(StreamTestCase):

    def test_first_call_is_none_then_memory_answers_without_another_subscribe(self):
        self.assertIsNone(self.market.ticker(BTC))
        row = wait_for(lambda: self.market.ticker(BTC))
        self.assertEqual((row["instId"], row["last"], row["bidPx"]), (BTC, "43000", "43000"))
        for _ in range(20):
            self.assertIsNotNone(self.market.ticker(BTC))
        self.assertEqual(len(self.subscribe_requests()), 1)
        self.assertEqual(self.okx.subscriptions(), {("tickers", BTC)})
        stats = self.market.stats()
        self.assertEqual((stats["connected"], stats["subscriptions"]), (True, 1))
        self.assertGreaterEqual(stats["served_from_memory"], 21)

    def test_answers_are_copies(self):
        wait_for(lambda: self.market.ticker(BTC))["last"] = "1"
        self.assertEqual(self.market.ticker(BTC)["last"], "43000")

    def test_ticker_change_reaches_the_answer_as_it_is_pushed(self):
        wait_for(lambda: self.market.ticker(BTC))
        self.okx.set_ticker(BTC, last="43123.4", bidPx="43123.3")
        pushed_at = self.clock.monotonic()
        changed = wait_for(lambda: (self.market.ticker(BTC) or {}).get("last") == "43123.4", interval=0.002)
        self.assertTrue(changed, "the new ticker did not reach memory")
        self.assertEqual(self.clock.monotonic(), pushed_at)     # no timer had to run: the push itself did it
        self.assertEqual(self.market.ticker(BTC)["bidPx"], "43123.3")

    def test_books_snapshot_and_updates_follow_the_fake(self):
        self.synced_depth(BTC)
        self.assert_book_matches(BTC)
        self.okx.set_level(BTC, "bids", "43000.05", "3.5")        # new best bid
        self.okx.set_level(BTC, "asks", "43000.1", "0")           # best ask deleted
        self.okx.set_level(BTC, "asks", "43000.4", "7")           # size changed
        self.okx.set_level(BTC, "bids", "42990", "0")             # a deeper level deleted
        self.assert_book_matches(BTC)
        book = self.market.depth(BTC, 3)
        self.assertEqual(book["bids"][0], ["43000.05", "3.5", "0", "1"])    # OKX's row, as REST has it
        self.assertEqual(len(book["asks"]), 3)
        self.assertTrue(book["ts"].isdigit())

    def test_depth_up_to_5_uses_books5(self):
        top = wait_for(lambda: self.market.depth(ETH, 5))
        bids, asks = self.okx.book(ETH)
        self.assertEqual(([level[:2] for level in top["bids"]], [level[:2] for level in top["asks"]]),
                         (bids[:5], asks[:5]))
        self.assertEqual([len(level) for level in top["bids"]], [4] * 5)
        self.assertEqual(self.okx.subscriptions(), {("books5", ETH)})
        self.okx.set_level(ETH, "asks", "2922.01", "99")
        self.assertTrue(wait_for(lambda: self.market.depth(ETH, 2)["asks"][0][:2] == ["2922.01", "99"]))

    def test_trades_need_a_seed_then_pushes_come_first(self):
        rest_rows = [self.okx.add_trade(BTC, "43000", "0.1") for _ in range(3)][::-1]   # newest first
        for row in rest_rows:
            del row["count"], row["seqId"]
        self.assertIsNone(self.market.trades(BTC, 3))
        self.market.seed_trades(BTC, rest_rows)     # fetched before the subscription: must be ignored
        wait_for(lambda: ("trades", BTC) in self.okx.subscriptions())
        self.assertTrue(wait_for(lambda: self.market.stats()["subscriptions"] == 1))
        self.assertIsNone(self.market.trades(BTC, 3))
        self.market.seed_trades(BTC, rest_rows)
        self.assertEqual(self.market.trades(BTC, 3), rest_rows)
        pushed = self.okx.add_trade(BTC, "43001", "0.2", side="sell")
        rows = wait_for(lambda: (self.market.trades(BTC, 4) or [{}])[0].get("tradeId") == pushed["tradeId"]
                        and self.market.trades(BTC, 4))
        self.assertEqual([row["tradeId"] for row in rows],
                         [pushed["tradeId"]] + [row["tradeId"] for row in rest_rows])
        self.assertEqual(set(rows[0]), {"instId", "tradeId", "px", "sz", "side", "ts", "source"})
        self.assertIsNone(self.market.trades(BTC, 5))        # more than memory holds: REST, then seed
        self.market.seed_trades(BTC, rows + rest_rows)       # duplicates are merged once
        self.assertEqual(len(self.market.trades(BTC, 4)), 4)

    def test_many_instruments_share_one_connection(self):
        instruments = [BTC, ETH, "LTC-USDT", "BTC-USDT-SWAP", "ETH-USDT-SWAP", "BTC-USD-SWAP"]
        for inst_id in instruments:
            self.market.ticker(inst_id)
            self.market.depth(inst_id, 20)
            self.market.depth(inst_id, 5)
        for inst_id in instruments:
            self.assertTrue(wait_for(lambda: self.market.ticker(inst_id) and self.market.depth(inst_id, 20)
                                     and self.market.depth(inst_id, 5)))
        self.assertEqual((self.okx.connections_total, self.okx.open_connections), (1, 1))
        self.assertEqual(len(self.okx.subscriptions()), 18)
        self.assertLessEqual(len(self.subscribe_requests()), 3)

    def test_concurrent_callers(self):
        wait_for(lambda: self.market.ticker(BTC) and self.market.depth(BTC, 50))
        errors = []

        def robot():
            try:
                for _ in range(300):
                    self.market.ticker(BTC)
                    self.market.depth(BTC, 50)
            except Exception as exc:       # pragma: no cover - reported below
                errors.append(exc)
        robots = [threading.Thread(target=robot) for _ in range(8)]
        for thread in robots:
            thread.start()
        for i in range(30):
            self.okx.set_level(BTC, "bids", "42999.%d" % (i % 9 + 1), str(i + 1))
        for thread in robots:
            thread.join()
        self.assertEqual(errors, [])
        self.assert_book_matches(BTC, 50)


class OrderBookSequenceTest(StreamTestCase):

    def test_heartbeat_reset_and_zero_checksums_keep_the_book(self):
        self.synced_depth(BTC)
        self.okx.send_heartbeat(BTC)
        self.okx.send_reset(BTC, 3)
        self.okx.set_level(BTC, "bids", "43000", "5")             # chains on from seqId 3
        self.okx.checksums = False
        self.okx.set_level(BTC, "asks", "43000.2", "6")           # checksum 0: nothing to verify
        self.okx.send_heartbeat(BTC)
        self.assert_book_matches(BTC)
        self.assertEqual(len(self.subscribe_requests()), 1)
        self.assertFalse([r for r in self.okx.received if isinstance(r, dict) and r.get("op") == "unsubscribe"])

    def resubscribed_after(self, damage):
        self.synced_depth(BTC)
        damage(BTC)
        unsubscribed = wait_for(lambda: [r for r in self.okx.received
                                         if isinstance(r, dict) and r.get("op") == "unsubscribe"])
        self.assertEqual(unsubscribed[0]["args"], [{"channel": "books", "instId": BTC}])
        self.assertTrue(wait_for(lambda: len(self.subscribe_requests()) == 2))
        self.assertEqual(self.subscribe_requests()[1]["args"], [{"channel": "books", "instId": BTC}])
        self.assert_book_matches(BTC)
        self.okx.set_level(BTC, "bids", "42999.95", "1")
        self.assert_book_matches(BTC)

    def test_gap_resubscribes_and_rebuilds_the_book(self):
        self.resubscribed_after(self.okx.send_gap)

    def test_bad_nonzero_checksum_resubscribes_and_rebuilds_the_book(self):
        self.resubscribed_after(self.okx.send_bad_checksum)

    def test_stream_without_snapshot_syncs_from_rest(self):
        calls = []

        def rest_book(inst_id):
            calls.append(inst_id)
            bids, asks = self.okx.book(inst_id)
            return {"asks": [row + ["0", "1"] for row in asks], "bids": [row + ["0", "1"] for row in bids],
                    "ts": str(int(time.time() * 1000)), "seqId": self.okx.seq_id(inst_id)}
        market = self.make_stream(rest_book=rest_book)
        self.okx.send_update_without_snapshot_next = True
        self.synced_depth(BTC, market=market)
        self.assertEqual(calls, [BTC])
        self.assert_book_matches(BTC, market=market)
        self.okx.set_level(BTC, "asks", "43000.15", "2")      # checksummed update on the REST-built book
        self.assert_book_matches(BTC, market=market)
        self.assertEqual(len(self.subscribe_requests()), 1)

    def test_failed_rest_sync_resubscribes(self):
        def rest_book(inst_id):
            raise OSError("REST is down")
        market = self.make_stream(rest_book=rest_book)
        self.okx.send_update_without_snapshot_next = True
        self.assertIsNone(market.depth(BTC, 20))
        self.synced_depth(BTC, market=market)        # the resubscription got a real snapshot
        self.assertEqual(len(self.subscribe_requests()), 2)
        self.assert_book_matches(BTC, market=market)


class ConnectionLossTest(StreamTestCase):

    def test_killed_connection_answers_none_at_once_then_recovers(self):
        wait_for(lambda: self.market.ticker(BTC) and self.market.depth(BTC, 20))
        self.okx.kill_connections()
        self.okx.set_ticker(BTC, last="44000")                   # while the stream is down
        self.assertTrue(wait_for(lambda: self.market.stats()["connected"] is False
                                 or self.okx.connections_total > 1))
        # never the old connection's ticker: either nothing or the new connection's
        self.assertIn((self.market.ticker(BTC) or {}).get("last"), (None, "44000"))
        self.assertEqual(wait_for(lambda: (self.market.ticker(BTC) or {}).get("last")), "44000")
        self.assertEqual(self.okx.connections_total, 2)
        self.assertEqual(self.okx.subscriptions(), {("tickers", BTC), ("books", BTC)})
        self.assert_book_matches(BTC, 20)
        self.assertEqual(self.market.stats()["reconnects"], 1)

    def test_close_frame_reconnects(self):
        wait_for(lambda: self.market.ticker(BTC))
        self.okx.close_connections(4004, "No data received in 30s")
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 2 and self.market.ticker(BTC)))
        self.assertEqual(self.okx.open_connections, 1)

    def test_notice_64008_reconnects(self):
        wait_for(lambda: self.market.ticker(BTC))
        self.okx.send_notice_64008()
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 2 and self.market.ticker(BTC)))
        self.assertEqual(self.market.stats()["reconnects"], 1)

    def test_quiet_connection_is_kept_alive_by_pongs(self):
        wait_for(lambda: self.market.ticker(BTC))
        for pings in range(1, 5):                            # no push at all: pongs prove the connection
            self.clock.advance(plugin.STREAM_PING_AFTER)
            self.assertTrue(wait_for(lambda: self.okx.pings_received == pings), pings)
            self.assertTrue(wait_for(lambda: self.market.heard_ago() == 0), pings)   # the pong arrived
        self.assertGreater(4 * plugin.STREAM_PING_AFTER, plugin.STREAM_FRESH_SECONDS)
        self.assertIsNotNone(self.market.ticker(BTC))
        self.assertEqual(self.okx.connections_total, 1)

    def test_silent_server_goes_to_rest_within_fresh_seconds(self):
        wait_for(lambda: self.market.ticker(BTC))
        self.okx.answer_pings = False
        self.clock.advance(plugin.STREAM_FRESH_SECONDS - 0.1)
        self.assertTrue(wait_for(lambda: self.okx.pings_received == 1))      # asked, never answered
        self.assertIsNotNone(self.market.ticker(BTC))
        self.clock.advance(0.2)
        self.assertIsNone(self.market.ticker(BTC))
        self.assertIsNone(self.market.depth(BTC, 5))
        self.assertEqual(self.okx.connections_total, 1)       # not given up yet: it may come back
        self.clock.advance(plugin.STREAM_DEAD_AFTER - plugin.STREAM_FRESH_SECONDS + 0.1)
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 2))   # given up, and opened anew
        self.assertEqual(self.market.stats()["reconnects"], 1)

    def test_bad_accept_is_rejected(self):
        self.okx.bad_accept = True
        self.assertIsNone(self.market.ticker(BTC))
        self.assertTrue(wait_for(lambda: self.clock.waiting()))   # two attempts failed: backing off
        self.assertIsNone(self.market.ticker(BTC))
        self.assertEqual(self.market.stats()["connected"], False)
        self.assertEqual(self.okx.connections_total, 2)
        self.assertEqual(self.subscribe_requests(), [])
        self.okx.bad_accept = False                          # the backoff retries, then it works
        self.clock.advance(plugin.STREAM_BACKOFF_FIRST)
        self.assertTrue(wait_for(lambda: self.market.ticker(BTC)))
        self.assertEqual(self.okx.connections_total, 3)

    @mock.patch.object(plugin, "STREAM_BACKOFF_FIRST", 0.01)
    def test_failing_connections_keep_to_3_per_second(self):
        self.okx.bad_accept = True
        started = self.clock.monotonic()
        self.market.ticker(BTC)
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 2 and self.clock.waiting()))
        self.clock.advance(0.01)                             # the first backoff: the 3rd attempt
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 3))
        self.clock.advance(0.5)                              # the backoff alone would allow a 4th now
        self.assertTrue(wait_for(lambda: [round(t - started, 6) for t in self.clock.waiting()] == [1.0]))
        self.assertEqual(self.okx.connections_total, 3)      # parked until the first attempt is 1 s old
        self.clock.advance(self.clock.waiting()[0] - self.clock.monotonic() + 1e-6)
        self.assertTrue(wait_for(lambda: self.okx.connections_total == 4))

    def test_unreachable_host_and_close_is_quick(self):
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        address = port.getsockname()
        port.close()                                         # nothing listens there
        market = plugin.MarketStream("ws://%s:%d" % address, self.clock)
        self.assertIsNone(market.ticker(BTC))
        self.assertTrue(wait_for(lambda: self.clock.waiting()))   # failed twice, backing off
        started = time.monotonic()
        market.close()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(market._thread.is_alive())

    def test_close_is_quick_and_stops_everything(self):
        wait_for(lambda: self.market.ticker(BTC))
        started = time.monotonic()
        self.market.close()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(self.market._thread.is_alive())
        self.assertIsNone(self.market.ticker(BTC))
        self.assertTrue(wait_for(lambda: self.okx.open_connections == 0))
        self.assertEqual(self.okx.connections_total, 1)


class SubscriptionTest(StreamTestCase):
    idle_seconds = 0.4

    def test_idle_subscription_is_unsubscribed(self):
        wait_for(lambda: self.market.ticker(BTC) and self.market.ticker(ETH))
        for _ in range(4):                                   # ETH is asked for, BTC is not
            self.market.ticker(ETH)
            self.clock.advance(0.15)
        self.assertTrue(wait_for(lambda: self.okx.subscriptions() == {("tickers", ETH)}))
        unsubscribes = [r for r in self.okx.received if isinstance(r, dict) and r.get("op") == "unsubscribe"]
        self.assertEqual(unsubscribes[0]["args"], [{"channel": "tickers", "instId": BTC}])
        self.assertIsNone(self.market.ticker(BTC))           # asked again: subscribed again
        self.assertTrue(wait_for(lambda: self.market.ticker(BTC)))
        self.clock.advance(self.idle_seconds + 0.1)
        self.assertTrue(wait_for(lambda: self.okx.open_connections == 0))    # nothing asked: closed
        self.assertTrue(wait_for(lambda: self.market.ticker(ETH)))          # and opened on demand
        self.assertEqual(self.okx.connections_total, 2)

    def test_unknown_instrument_is_not_asked_again_at_once(self):
        self.assertIsNone(self.market.ticker("NOPE-USDT"))
        wait_for(lambda: self.market.ticker(BTC))            # OKX's refusal came before BTC's answer
        self.clock.advance(1.0)
        self.market.ticker("NOPE-USDT")
        self.market.ticker(ETH)                              # a request the stream sends after any for NOPE
        self.assertTrue(wait_for(lambda: self.market.ticker(ETH)))
        requested = [arg for r in self.subscribe_requests() for arg in r["args"] if arg["instId"] == "NOPE-USDT"]
        self.assertEqual(len(requested), 1)
        self.assertIsNone(self.market.ticker("NOPE-USDT"))


class TransportTest(unittest.TestCase):
    """The WebSocket client itself: frames, proxy tunnel, TLS."""

    def setUp(self):
        plugin.LiveConnection._connect_times.clear()      # every VirtualClock starts at the same moment
        quick_stream_threads(self)

    def client_with_peer(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        client = plugin.WebSocketClient("ws://127.0.0.1:1/ws/v5/public", VirtualClock())
        client.sock, client._upgraded = ours, True
        ours.settimeout(plugin.STREAM_POLL)
        self.addCleanup(client.close)
        return client, theirs

    def read_client_frame(self, peer):
        head = peer.recv(2)
        length = head[1] & 0x7F
        self.assertTrue(head[1] & 0x80, "client frames must be masked")
        mask = peer.recv(4)
        payload = peer.recv(length) if length else b""
        return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def test_fragmented_message_with_a_ping_inside(self):
        client, peer = self.client_with_peer()
        peer.sendall(encode_frame(0x1, b'{"a":', fin=False) + encode_frame(0x9, b"hi")
                     + encode_frame(0x0, b'"b"}') + encode_frame(0x1, b"pong"))
        self.assertEqual(wait_for(client.receive), ['{"a":"b"}', "pong"])
        self.assertEqual(self.read_client_frame(peer), (0xA, b"hi"))
        client.send_text("ping")
        self.assertEqual(self.read_client_frame(peer), (0x1, b"ping"))

    def test_oversized_message_closes_1009(self):
        client, peer = self.client_with_peer()
        peer.sendall(encode_frame(0x1, b"x" * 10, fin=False))      # 10 bytes, then a continuation that
        peer.sendall(bytes([0x80, 127]) + struct.pack("!Q", plugin.STREAM_MAX_MESSAGE))   # passes the bound
        with self.assertRaises(plugin.StreamError):
            for _ in range(5):
                client.receive()
        self.assertEqual(self.read_client_frame(peer), (0x8, struct.pack("!H", 1009)))

    def test_masked_server_frame_closes_1002(self):
        client, peer = self.client_with_peer()
        peer.sendall(encode_frame(0x1, b"pong", mask_key=b"abcd"))
        with self.assertRaises(plugin.StreamError):
            client.receive()
        self.assertEqual(self.read_client_frame(peer), (0x8, struct.pack("!H", 1002)))

    def test_checksum_worked_examples_and_the_fakes_books(self):
        with FakeOKXStream() as okx:
            for inst_id in (BTC, "BTC-USDT-SWAP"):
                bids, asks = okx.book(inst_id)
                self.assertEqual(plugin.okx_book_checksum(bids, asks), okx_book_checksum(bids, asks))
                self.assertEqual(plugin.okx_book_checksum(bids[:3], []), okx_book_checksum(bids[:3], []))
        self.assertEqual(plugin.okx_book_checksum([["3366.1", "7"]],
                                                  [["3366.8", "9"], ["3368", "8"], ["3372", "8"]]), 831078360)
        self.assertEqual(plugin.okx_book_checksum([["3366.1", "7"], ["3366", "6"]],
                                                  [["3366.8", "9"], ["3368", "8"]]), -1881014294)

    def test_websocket_accept_of_rfc_example(self):
        self.assertEqual(plugin.websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_through_an_authenticating_connect_proxy(self):
        clock = VirtualClock()
        with FakeOKXStream(clock=clock) as okx:
            proxy = _ConnectProxy("user", "secret")
            self.addCleanup(proxy.stop)
            market = plugin.MarketStream(okx.url, clock, proxy=proxy.as_product_proxy("user", "secret"))
            self.addCleanup(market.close)
            self.assertTrue(wait_for(lambda: market.ticker(BTC)))
            self.assertEqual(proxy.tunnels, ["127.0.0.1:%d" % okx.port])
            market.close()
            refused = plugin.MarketStream(okx.url, clock, proxy=proxy.as_product_proxy("user", "wrong"))
            self.addCleanup(refused.close)
            refused.ticker(BTC)
            self.assertTrue(wait_for(lambda: clock.waiting()))     # refused twice, backing off
            self.assertIsNone(refused.ticker(BTC))
            self.assertEqual(len(proxy.tunnels), 1)

    def test_tls_is_verified_with_the_given_context(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        cert, key = write_test_cert(folder)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        clock = VirtualClock()
        with FakeOKXStream(ssl_context=server_context, clock=clock) as okx:
            trusting = plugin.MarketStream(okx.url, clock, ssl_context=ssl.create_default_context(cafile=cert))
            self.addCleanup(trusting.close)
            self.assertTrue(wait_for(lambda: trusting.depth(BTC, 400)))
            bids, asks = okx.book(BTC)
            self.assertEqual([level[:2] for level in trusting.depth(BTC, 400)["bids"]], bids)
            trusting.close()
            distrusting = plugin.MarketStream(okx.url, clock, ssl_context=ssl.create_default_context())
            self.addCleanup(distrusting.close)
            distrusting.ticker(BTC)
            self.assertTrue(wait_for(lambda: clock.waiting()))     # refused twice, backing off
            self.assertIsNone(distrusting.ticker(BTC))
            self.assertEqual(distrusting.stats()["connected"], False)


class _ProductProxy:
    """Stands for the product's ``Proxy``: ``host``, ``port``, ``headers``, and ``str()`` without password."""

    def __init__(self, port, user, password):
        self.host, self.port, self.user = "127.0.0.1", port, user
        token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        self.headers = {"Proxy-Authorization": "Basic " + token}

    def __str__(self):
        return "http://%s@%s:%d" % (self.user, self.host, self.port)


class _ConnectProxy:
    """A tiny HTTP CONNECT proxy on 127.0.0.1 that wants Basic credentials; records the tunnels opened."""

    def __init__(self, user, password):
        self.expected = "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        self.tunnels = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def as_product_proxy(self, user, password):
        """What the product's ``Proxy("http://user:password@127.0.0.1:port")`` offers the stream."""
        return _ProductProxy(self.port, user, password)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        if headers.get("Proxy-Authorization") != self.expected:
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        target = lines[0].split()[1]
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.sockets.append(upstream)
        self.tunnels.append(target)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


class StreamPluginTest(PluginTestCase):
    """ticker, depth and trades through the plugin with the live stream on: memory after the first call,
    REST whenever the stream cannot prove it is current."""

    def setUp(self):
        super().setUp()
        plugin.LiveConnection._connect_times.clear()
        quick_stream_threads(self)
        self.okx_stream = FakeOKXStream(clock=self.clock).start()
        self.addCleanup(self.okx_stream.stop)
        self.server = self.start_plugin(stream=True, ws_base=self.okx_stream.url)
        self.docker = Docker(self.server.server_address[1])
        self.addCleanup(self.docker.close)

    def market_requests(self):
        return [r for r in self.fake.requests if r["path"].startswith("/api/v5/market/")]

    def until_from_memory(self, method, params):
        """Call until an answer costs no REST request; returns that answer's data."""
        return self.answer_from_memory(method, params)["data"]

    def answer_from_memory(self, method, params):
        """Call until an answer costs no REST request; returns that answer (data and raw)."""
        def from_memory():
            before = len(self.market_requests())
            answer = self.docker.call(method, params)
            self.assertIn("data", answer, answer)
            return answer if len(self.market_requests()) == before else None
        answer = wait_for(from_memory, timeout=3)
        self.assertIsNotNone(answer, "%s never came from the stream" % method)
        return answer

    def test_after_the_first_call_no_rest_request(self):
        self.data("ticker", {"symbol": "BTC_USDT"})
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 1)      # the first from REST
        self.until_from_memory("ticker", {"symbol": "BTC_USDT"})
        self.until_from_memory("depth", {"symbol": "BTC_USDT", "limit": 5})
        self.until_from_memory("depth", {"symbol": "BTC_USDT", "limit": 50})
        self.until_from_memory("trades", {"symbol": "BTC_USDT"})
        self.fake.clear_requests()
        for _ in range(20):
            ticker = self.data("ticker", {"symbol": "BTC_USDT"})
            depth = self.data("depth", {"symbol": "BTC_USDT", "limit": 50})
            self.data("depth", {"symbol": "BTC_USDT", "limit": 3})
            self.data("trades", {"symbol": "BTC_USDT"})
        self.assertEqual(self.market_requests(), [])
        bids, asks = self.okx_stream.book("BTC-USDT")
        self.assertEqual((depth["bids"], depth["asks"]), (bids[:50], asks[:50]))
        self.assertEqual(set(ticker), {"symbol", "buy", "sell", "high", "low", "open", "last", "vol", "time"})

    def test_a_price_change_reaches_the_answer_as_it_is_pushed(self):
        self.until_from_memory("ticker", {"symbol": "BTC_USDT"})
        self.okx_stream.set_ticker("BTC-USDT", last="51234.5", bidPx="51234.4", askPx="51234.6")
        changed_at = self.clock.monotonic()
        ticker = wait_for(lambda: self.data("ticker", {"symbol": "BTC_USDT"})["last"] == "51234.5")
        self.assertTrue(ticker)
        self.assertEqual(self.clock.monotonic(), changed_at)     # no timer had to run: the push did it
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["buy"], "51234.4")

    def test_a_killed_stream_gives_rest_answers_then_comes_back(self):
        self.until_from_memory("ticker", {"symbol": "ETH_USDT"})
        self.fake.set_price("ETH-USDT", "3100.01", "3100.02")
        self.okx_stream.bad_accept = True          # reconnecting fails until the stream is back
        self.okx_stream.kill_connections()
        stream = self.server.exchanges["okx"].streams()[0]
        self.assertTrue(wait_for(lambda: self.clock.waiting()))    # reconnecting failed: backing off
        self.assertFalse(stream.stats()["connected"])
        self.fake.clear_requests()
        for _ in range(3):
            self.assertEqual(self.data("ticker", {"symbol": "ETH_USDT"})["buy"], "3100.01")   # REST, not memory
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 3)
        self.okx_stream.bad_accept = False
        self.clock.advance(plugin.STREAM_BACKOFF_FIRST)
        self.assertEqual(self.until_from_memory("ticker", {"symbol": "ETH_USDT"})["buy"], "2922")
        self.assertGreaterEqual(self.okx_stream.connections_total, 2)

    def test_a_silent_stream_is_never_trusted(self):
        self.until_from_memory("ticker", {"symbol": "BTC_USDT"})
        self.okx_stream.answer_pings = False
        self.clock.advance(plugin.STREAM_FRESH_SECONDS + 0.1)
        self.fake.clear_requests()
        self.fake.set_price("BTC-USDT", "40000.1", "40000.2")
        self.assertEqual(self.data("ticker", {"symbol": "BTC_USDT"})["buy"], "40000.1")
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 1)

    def test_depth_raw_has_okx_rows_from_the_stream_as_from_rest(self):
        for limit in (5, 50):                             # books5, and books
            with self.subTest(limit=limit):
                params = {"symbol": "BTC_USDT", "limit": limit}
                self.fake.clear_requests()
                from_rest = self.docker.call("depth", params)
                self.assertEqual(len(self.okx_calls("/api/v5/market/books")), 1)
                from_stream = self.answer_from_memory("depth", params)
                for answer in (from_rest, from_stream):
                    for side in ("asks", "bids"):
                        self.assertEqual(len(answer["raw"][side]), limit)
                        for level in answer["raw"][side]:           # [px, sz, "0", orders], as OKX sends
                            self.assertEqual(len(level), 4, (side, level))
                            self.assertEqual(level[2], "0")
                            self.assertTrue(level[3].isdigit(), level)
                        self.assertEqual(answer["data"][side], [level[:2] for level in answer["raw"][side]])
                bids, asks = self.okx_stream.book("BTC-USDT")
                self.assertEqual(from_stream["data"]["asks"], asks[:limit])

    def test_many_robots_on_many_instruments_share_one_connection(self):
        symbols = ["BTC_USDT", "ETH_USDT", "LTC_USDT", "BTC_USDT.swap"]

        def robot(symbol):
            docker = Docker(self.server.server_address[1])
            for _ in range(5):
                docker.call("ticker", {"symbol": symbol})
                docker.call("depth", {"symbol": symbol, "limit": 10})
            docker.close()
        robots = [threading.Thread(target=robot, args=(symbol,)) for symbol in symbols * 2]
        for thread in robots:
            thread.start()
        for thread in robots:
            thread.join()
        for symbol in symbols:
            self.until_from_memory("ticker", {"symbol": symbol})
        self.assertEqual(self.okx_stream.connections_total, 1)
        self.assertEqual(len([s for s in self.okx_stream.subscriptions() if s[0] == "tickers"]), 4)

    def test_no_stream_makes_every_call_rest(self):
        server = self.start_plugin(stream=False, ws_base=self.okx_stream.url)
        docker = Docker(server.server_address[1])
        self.addCleanup(docker.close)
        for _ in range(5):
            docker.call("ticker", {"symbol": "BTC_USDT"})
        self.assertEqual(len(self.okx_calls("/api/v5/market/ticker")), 5)
        self.assertEqual(self.okx_stream.connections_total, 0)

    def test_stream_hosts_follow_the_api_base_and_demo_keys(self):
        live = plugin.OKXShared(plugin.Config(api_base="https://www.okx.com"))
        eea = plugin.OKXShared(plugin.Config(api_base="https://eea.okx.com"))
        local = plugin.OKXShared(plugin.Config(api_base=self.fake.base_url))
        for shared in (live, eea, local):
            self.addCleanup(shared.close)
        self.assertEqual(live.market_stream().url, "wss://ws.okx.com:8443/ws/v5/public")       # made, not connected
        self.assertEqual(live.market_stream(demo=True).url, "wss://wspap.okx.com:8443/ws/v5/public")
        self.assertEqual(eea.market_stream(demo=True).url, "wss://wseeapap.okx.com:8443/ws/v5/public")
        self.assertIsNone(local.market_stream())
        self.assertIsNone(plugin.OKXShared(plugin.Config(api_base="https://www.okx.com", stream=False)).market_stream())


# ---- Live account data ----
#
# The plugin's account stream (AccountStream: OKX's /ws/v5/private per key) through the plugin, as FMZ's
# docker sees it. A FakeOKXStream bound to the fake serves the private channels, --ws-base points the plugin
# at it, and every read is checked for where its answer came from (memory: the fake received no request at
# all during the call) and for what it answered (what REST answers: a second plugin started with
# private_stream=False reads the same fake). Time is the test's VirtualClock: it stands still unless a test
# moves it, so an answer from memory is never excused by time that passed; only the pushes travel in real
# time, and the tests wait for them with generous real timeouts.

OTHER_KEY, OTHER_SECRET, OTHER_PASSPHRASE = ("0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B",
                                             "Other-Pass-1")
OTHER_SECRET_FIELD = OTHER_SECRET + "," + OTHER_PASSPHRASE
OTHER_BALANCES = {"USDT": "777", "BTC": "0.25", "LTC": "12"}


def canonical(value):
    """A JSON text of ``value`` with sorted keys: a sort key for rows whose order does not matter."""
    return json.dumps(value, sort_keys=True)


_plugin_tls_context = plugin.tls_context
_tls_contexts = {}


def reused_tls_context(ca_file=None):
    """plugin.tls_context, made once per ca_file: loading the system's CAs takes ~40 ms, and the plugin makes
    one for every new stream, even a ws:// one (as the fake streams are) that never uses it."""
    if ca_file not in _tls_contexts:
        _tls_contexts[ca_file] = _plugin_tls_context(ca_file)
    return _tls_contexts[ca_file]


class AccountStreamTestCase(PluginTestCase):
    """PluginTestCase whose plugin (``self.server``, ``self.docker``) reads balances, positions and orders from
    the private stream of ``self.okx_stream``. Helpers say where each answer came from."""

    def setUp(self):
        super().setUp()
        plugin.LiveConnection._connect_times.clear()
        # As quick_stream_threads, faster still: stream threads look at their sockets every 2 ms of real time.
        for name, value in (("tls_context", reused_tls_context), ("STREAM_POLL", 0.002)):
            patcher = mock.patch.object(plugin, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.okx_stream = FakeOKXStream(okx=self.fake, clock=self.clock).start()
        self.addCleanup(self.okx_stream.stop)
        self.use_plugin()

    def use_plugin(self, **options):
        """Serve the rest of the test from a new plugin on the fake stream (``options``: Config's)."""
        options = dict({"stream": True, "ws_base": self.okx_stream.url}, **options)
        self.server = self.start_plugin(**options)
        self.docker = self.docker_for(self.server)

    def docker_for(self, server, **fields):
        docker = Docker(server.server_address[1], **fields)
        self.addCleanup(docker.close)
        return docker

    def rest_docker(self, **fields):
        """A docker on a second plugin that reads every account over REST (private_stream=False)."""
        return self.docker_for(self.start_plugin(private_stream=False), **fields)

    def other_docker(self, server=None):
        """A docker with the key of a second live account (OTHER_KEY), which this helper opens on the fake."""
        with self.fake._lock:
            self.fake.accounts.setdefault(OTHER_KEY, new_account(OTHER_SECRET, OTHER_PASSPHRASE, False,
                                                                 "66927014565831706", OTHER_BALANCES))
        return self.docker_for(server or self.server, access_key=OTHER_KEY, secret_key=OTHER_SECRET_FIELD)

    def account_stream(self, key=KEY, server=None):
        """The plugin's AccountStream of ``key`` (None before the key's first private read)."""
        for stream in (server or self.server).exchanges["okx"].streams():
            if isinstance(stream, plugin.AccountStream) and stream.credentials.api_key == key:
                return stream
        return None

    def call(self, method, params=None, docker=None, **fields):
        """One call: (its answer, the requests the fake received meanwhile)."""
        before = len(self.fake.requests)
        answer = (docker or self.docker).call(method, params, **fields)
        return answer, self.fake.requests[before:]

    def memory(self, method, params=None, docker=None, **fields):
        """The data of one call that must be answered from memory (no request reached the fake)."""
        answer, requests = self.call(method, params, docker, **fields)
        self.assertNotIn("error", answer)
        self.assertEqual([r["method"] + " " + r["path"] for r in requests], [],
                         "%s %s was not answered from memory" % (method, params))
        return answer["data"]

    def rest(self, method, params=None, docker=None, **fields):
        """The data of one call that must be answered over REST."""
        answer, requests = self.call(method, params, docker, **fields)
        self.assertNotIn("error", answer)
        self.assertTrue(requests, "%s %s was answered from memory" % (method, params))
        return answer["data"]

    def from_memory(self, method, params=None, docker=None, **fields):
        """Call until an answer costs no request (the stream has caught up); returns that answer."""
        def answered_from_memory():
            answer, requests = self.call(method, params, docker, **fields)
            self.assertNotIn("error", answer)
            return answer if not requests else None
        answer = wait_for(answered_from_memory, timeout=5, interval=0.002)
        self.assertIsNotNone(answer, "%s %s never came from memory" % (method, params))
        return answer

    def warm_up(self, docker=None, **fields):
        """Read accounts, positions and orders until each comes from memory."""
        for method in ("accounts", "positions", "orders"):
            self.from_memory(method, docker=docker, **fields)

    def wait_until(self, probe, what, timeout=5):
        self.assertTrue(wait_for(probe, timeout=timeout, interval=0.002), what)

    def logins(self, key=KEY):
        """OKX's answer codes to the logins of ``key`` on the fake stream, in order ("0": logged in)."""
        return [code for api_key, code in list(self.okx_stream.logins) if api_key == key]

    def send_private(self, message, key=KEY):
        """Send ``message`` on every logged-in private connection of ``key`` (events OKX sends on its own)."""
        with self.okx_stream._lock:
            conns = [conn for conn in self.okx_stream._conns
                     if conn.is_open and conn.path == PRIVATE_PATH and conn.api_key == key]
            for conn in conns:
                conn.send_json(dict(message, connId=conn.conn_id))
        self.assertTrue(conns, "no private connection of %s" % key[:4])

    def balance(self, data, ccy):
        """(free, frozen) of one currency in an accounts answer's data, as Decimals (None when absent)."""
        rows = [row for row in data if row["currency"] == ccy]
        return (Decimal(rows[0]["free"]), Decimal(rows[0]["frozen"])) if rows else None

    def place_as(self, docker, symbol="BTC_USDT", type="buy", price="30000", amount="0.01"):
        """Place an order through ``docker`` (another key's robot); returns the docker order id."""
        answer = docker.call("trade", {"symbol": symbol, "type": type, "price": price, "amount": amount})
        self.assertIn("data", answer, answer)
        return answer["data"]["id"]

    def shows(self, method, check, params=None, docker=None):
        """True when one call is answered from memory and ``check(data)`` holds (a probe for wait_until)."""
        answer, requests = self.call(method, params, docker)
        return not requests and "data" in answer and check(answer["data"])

    def pushes_heard(self, seconds=plugin.STREAM_PING_AFTER):
        """Once the fake stream has sent every push that is due, move the clock by ``seconds`` (enough for
        STREAM_PING_AFTER of silence, so the plugin pings) and wait until each account stream heard something
        at the new time: whatever was sent before has then reached memory, and the stream's thread runs on the
        new time. (Memory stamps a push with the time its thread's turn began, not with its arrival, so a write
        right after a bare clock.advance can look newer than its own push: see AccountStreamMemoryRulesTest.)"""
        def all_due_sent():
            with self.okx_stream._lock:
                now = self.clock.monotonic()
                return not any(entry[0] is None or entry[0] <= now for entry in self.okx_stream._outbox)
        self.wait_until(all_due_sent, "the fake stream did not send its pushes")
        with self.okx_stream._deliver_lock:              # a delivery under way has been written
            pass
        self.clock.advance(seconds)
        for stream in self.server.exchanges["okx"].streams():
            if isinstance(stream, plugin.AccountStream) and stream.heard_ago() is not None:
                self.wait_until(lambda: stream.heard_ago() == 0, "%s did not answer the ping" % stream.name)

    def stream_thread_done(self, key=KEY):
        """True once the key's stream thread has ended (it starts again only on a read)."""
        stream = self.account_stream(key)
        return stream is not None and stream._thread is None

    def get(self, path):
        """A GET of the plugin's ``path`` (/status, say): (the response, its text)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", path)
        response = connection.getresponse()
        return response, response.read().decode("utf-8")


class AccountMemoryTest(AccountStreamTestCase):
    """After warm-up, accounts, assets, positions, orders and order come from memory, with REST's data."""

    SYMBOLS = ("BTC_USDT", "ETH_USDT", "BTC_USDT.swap", "ETH_USDT.swap")

    def open_orders_and_positions(self, hedge=False):
        """Resting orders and open positions, half made before the stream connected (its snapshots and
        REST's open orders hold them) and half after (pushes bring them); returns the docker ids."""
        ids = [self.place(), self.place("BTC_USDT.swap", "buy", "30000", "1"),
               self.place("BTC_USDT.swap", "buy", "-1", "2")]
        self.warm_up()
        self.pushes_heard()              # later positions are newer (cTime)
        ids += [self.place("ETH_USDT", "sell", "5000", "0.5"), self.place("ETH_USDT.swap", "sell", "-1", "3"),
                self.place("ETH_USDT.swap", "sell", "4000", "1")]
        if hedge:
            ids.append(self.place("BTC_USDT.swap", "sell", "-1", "1"))
        self.from_memory("orders")       # every order's own push has come...
        self.pushes_heard()              # ... and the pushes behind them; the writes' settling time is over
        return ids

    def assert_memory_equals_rest(self, ids, exact_positions=True):
        rest = self.rest_docker()
        calls = [("accounts", None), ("assets", None), ("positions", None), ("orders", None)]
        calls += [("orders", {"symbol": symbol}) for symbol in self.SYMBOLS]
        calls += [("positions", {"symbol": symbol}) for symbol in self.SYMBOLS if "." in symbol]
        calls += [("order", {"id": order_id}) for order_id in ids[3:]]          # those the stream saw
        calls += [("order", {"id": row["id"]}) for row in self.memory("orders")]
        for method, params in calls:
            with self.subTest(method=method, params=params):
                mine, theirs = self.memory(method, params), rest.call(method, params)
                self.assertNotIn("error", theirs)
                if method == "positions" and not exact_positions:
                    mine, theirs["data"] = sorted(mine, key=canonical), sorted(theirs["data"], key=canonical)
                self.assertEqual(mine, theirs["data"])
        self.assertEqual(len(self.memory("orders")), 4)
        self.assertEqual(len(self.memory("positions")), 3 if len(ids) > 6 else 2)

    def test_reads_come_from_memory_with_rest_data_in_net_mode(self):
        self.assert_memory_equals_rest(self.open_orders_and_positions(), exact_positions=False)

    def test_reads_come_from_memory_with_rest_data_in_long_short_mode(self):
        self.fake.set_position_mode("long_short_mode")
        ids = self.open_orders_and_positions(hedge=True)
        self.assertEqual(sorted(p["type"] for p in self.memory("positions")), [0, 1, 1])      # long, short, short
        self.assert_memory_equals_rest(ids, exact_positions=False)

    def test_positions_from_memory_are_in_rest_order(self):
        self.assert_memory_equals_rest(self.open_orders_and_positions(), exact_positions=True)

    def test_a_fill_reaches_every_read_without_time_passing(self):
        spot, swap = self.place(), self.place("BTC_USDT.swap", "buy", "30000", "2")
        self.warm_up()
        rest = self.rest_docker()
        calls = [("order", {"id": spot}), ("order", {"id": swap}), ("orders", None), ("accounts", None),
                 ("positions", None)]
        before = [self.memory(*call) for call in calls]
        self.assertEqual((before[0]["status"], len(before[2]), before[4]), ("pending", 2, []))
        frozen_at = self.clock.monotonic()
        self.fake.fill(spot.split(",")[1])
        self.fake.fill(swap.split(",")[1], sz="1")                   # half of it
        wanted = [rest.call(*call)["data"] for call in calls]
        self.assertEqual((wanted[0]["status"], wanted[1]["status"]), ("filled", "partial-filled"))
        self.assertTrue(all(now != then for now, then in zip(wanted, before)))
        self.wait_until(lambda: [self.memory(*call) for call in calls] == wanted, "the fill never reached memory")
        self.assertEqual(self.clock.monotonic(), frozen_at)             # no timer helped: the pushes did it
        self.assertEqual(self.memory("positions", {"symbol": "BTC_USDT.swap"})[0]["amount"], "1")

    def test_an_emptied_currency_leaves_accounts_as_it_leaves_rest(self):
        self.warm_up()
        rest = self.rest_docker()
        self.fake.set_balance("LTC", "4")                          # a new currency (pushed) ...
        self.fake.set_balance("ETH", "0")                          # ... and one emptied
        wanted = sorted(rest.call("accounts")["data"], key=canonical)
        self.assertEqual([row["currency"] for row in wanted], ["BTC", "LTC", "USDT"])
        self.wait_until(lambda: self.balance(self.memory("accounts"), "LTC") is not None, "no LTC push")
        self.wait_until(lambda: self.balance(self.memory("accounts"), "ETH") != (3, 0), "no ETH push")
        # (OKX documents no order of the currencies: compared sorted)
        self.assertEqual(sorted(self.memory("accounts"), key=canonical), wanted)


class ReadYourWritesTest(AccountStreamTestCase):
    """After trade or cancel answered, order, orders, accounts and positions show the write at once, however
    OKX's pushes come: late, twice, or before the REST answer."""

    def assert_shows(self, order_id, statuses, listed):
        """order shows ``order_id`` in one of ``statuses``; orders (of its symbol, and all) lists it or not."""
        symbol = "ETH_USDT" if order_id.startswith("ETH-USDT,") else "BTC_USDT"
        self.assertIn(self.data("order", {"id": order_id})["status"], statuses)
        for params in ({"symbol": symbol}, None):
            ids = [row["id"] for row in self.data("orders", params)]
            self.assertEqual(order_id in ids, listed, (order_id, params, ids))

    def test_trade_and_cancel_show_at_once_however_the_pushes_come(self):
        self.warm_up()
        elsewhere = self.place("ETH_USDT", "sell", "5000", "0.1")
        defaults = {"push_delay_s": 0.0, "duplicate_pushes": False, "push_before_answer": False}
        knobs = ({"push_delay_s": 1}, {"push_delay_s": 1, "duplicate_pushes": True}, {"push_before_answer": True})
        for knob in knobs:
            with self.subTest(**knob):
                self.pushes_heard()                                  # the writes are later than any push
                usdt = self.balance(self.memory("accounts"), "USDT")
                for name, value in knob.items():
                    setattr(self.okx_stream, name, value)
                order_id = self.place()
                self.assert_shows(order_id, ("pending",), listed=True)
                self.assertEqual(self.balance(self.data("accounts"), "USDT"), (usdt[0] - 300, usdt[1] + 300))
                self.assertEqual(self.memory("order", {"id": elsewhere})["status"], "pending")  # others: memory
                self.clock.advance(0.5)
                self.assert_shows(order_id, ("pending",), listed=True)
                self.assertEqual(self.balance(self.data("accounts"), "USDT"), (usdt[0] - 300, usdt[1] + 300))
                self.clock.advance(0.5)                              # delayed pushes are due now
                self.assertEqual(self.from_memory("order", {"id": order_id})["data"]["status"], "pending")
                self.assertIn(order_id, [row["id"] for row in self.from_memory("orders")["data"]])
                self.assertTrue(self.data("cancel", {"id": order_id}))
                for step in (0, 0.5, 0.5):
                    self.clock.advance(step)
                    self.assert_shows(order_id, ("canceled",), listed=False)
                self.assertEqual(self.from_memory("order", {"id": order_id})["data"]["status"], "canceled")
                self.pushes_heard()
                self.assertEqual(self.memory("order", {"id": order_id})["status"], "canceled")
                self.assertNotIn(order_id, [row["id"] for row in self.memory("orders")])
                self.assertEqual(self.balance(self.memory("accounts"), "USDT"), usdt)
                for name in knob:
                    setattr(self.okx_stream, name, defaults[name])

    def test_a_contract_order_shows_in_balances_and_positions_at_once(self):
        self.warm_up()
        self.pushes_heard()
        self.okx_stream.push_delay_s = 1
        usdt = self.balance(self.memory("accounts"), "USDT")
        self.place("BTC_USDT.swap", "buy", "-1", "2")                      # fills at once
        for step in (0, 0.5, 0.4):
            self.clock.advance(step)
            positions = self.rest("positions")
            self.assertEqual([(p["symbol"], p["amount"]) for p in positions], [("BTC_USDT.swap", "2")])
            self.assertLess(self.balance(self.rest("accounts"), "USDT")[0], usdt[0])
        self.clock.advance(0.1)                                            # the pushes are due
        stream = self.account_stream()
        self.wait_until(lambda: stream._positions, "no positions push")      # (what memory holds)
        self.assertEqual([p["amount"] for p in self.memory("positions")], ["2"])
        self.assertLess(self.balance(self.memory("accounts"), "USDT")[0], usdt[0])

    def test_balances_after_a_write_are_never_older_than_it_when_pushes_are_late(self):
        self.warm_up()
        self.pushes_heard()
        self.okx_stream.push_delay_s = 1
        stream = self.account_stream()
        self.clock.advance(0.5)
        self.fake.set_balance("ETH", "7")                                  # pushed 1 s later, at +1.5 s
        self.clock.advance(0.4)
        self.place()                                                       # freezes 300 USDT; pushed at +1.9 s
        self.assertEqual(self.balance(self.data("accounts"), "USDT"), (9700, 300))
        self.pushes_heard(0.1)                                             # +1 s: its thread runs on this time
        self.assertEqual(self.balance(self.data("accounts"), "USDT"), (9700, 300))
        self.clock.advance(0.5)                                            # the ETH push arrives, not the order's
        self.wait_until(lambda: stream._details.get("ETH", {}).get("cashBal") == "7", "no ETH push")
        self.assertEqual(self.balance(self.data("accounts"), "USDT"), (9700, 300))
        self.clock.advance(0.5)
        self.okx_stream.push_delay_s = 1.5                                 # a push later than a second
        self.clock.advance(1)
        self.place()
        self.clock.advance(1.2)
        self.assertEqual(self.balance(self.data("accounts"), "USDT"), (9400, 600))

    def test_a_canceled_order_is_not_live_again_when_its_push_is_late(self):
        self.warm_up()
        order_id = self.place()
        self.assertEqual(self.from_memory("order", {"id": order_id})["data"]["status"], "pending")
        self.okx_stream.push_delay_s = 30
        self.assertTrue(self.data("cancel", {"id": order_id}))
        self.clock.advance(plugin.ORDER_PUSH_WAIT + 0.5)
        stream = self.account_stream()
        self.wait_until(lambda: stream.status()["live"], "the stream did not answer the ping")
        self.assert_shows(order_id, ("canceled",), listed=False)          # overdue: open orders are read again
        self.wait_until(lambda: any("no push for order %s" % order_id.split(",")[1] in line for line in LOGS.lines),
                        "no warning about the missing push")
        self.wait_until(lambda: stream.status()["synced"]["orders"], "open orders were not read again")
        self.assert_shows(order_id, ("canceled",), listed=False)


class AmendmentReadYourWritesTest(AccountStreamTestCase):
    """After modifyorder answered, order, orders and accounts show the amended price and amount at once,
    also when OKX's push of the amendment comes after modifyorder stopped waiting for it."""

    def test_an_amendment_shows_at_once_when_its_push_comes_late(self):
        order_id = self.place()
        elsewhere = self.place("ETH_USDT", "sell", "5000", "0.1")
        self.warm_up()
        self.assertEqual(self.from_memory("order", {"id": order_id})["data"]["price"], "30000")
        self.pushes_heard()
        self.okx_stream.push_delay_s = plugin.AMEND_PUSH_WAIT + 1      # later than modifyorder waits for it
        answers = []
        amending = threading.Thread(target=lambda: answers.append(self.docker.call(
            "modifyorder", {"id": order_id, "price": "30001", "amount": "0.02"})))
        push_wait_ends = self.clock.monotonic() + plugin.AMEND_PUSH_WAIT
        amending.start()
        self.wait_until(lambda: push_wait_ends in self.clock.waiting(), "modifyorder did not wait for the push")
        self.clock.advance(plugin.AMEND_PUSH_WAIT)                    # no push came: the order is read back
        amending.join(10)
        self.assertEqual([answer.get("data") for answer in answers], [{"id": order_id}], answers)
        frozen = (Decimal("9399.98"), Decimal("600.02"))               # 0.02 at 30001
        for step in (0, 0.5):
            self.clock.advance(step)
            shown = self.rest("order", {"id": order_id})
            self.assertEqual((shown["price"], shown["amount"]), ("30001", "0.02"))
            listed = [(row["price"], row["amount"]) for row in self.rest("orders", {"symbol": "BTC_USDT"})]
            self.assertEqual(listed, [("30001", "0.02")])
            self.assertEqual(self.balance(self.rest("accounts"), "USDT"), frozen)
            self.assertEqual(self.memory("order", {"id": elsewhere})["status"], "pending")   # others: memory
        self.clock.advance(0.5)                                        # the amendment's pushes are due
        self.wait_until(lambda: self.shows("order", lambda data: data["price"] == "30001", {"id": order_id}),
                        "the amendment's push never reached memory")
        self.assertEqual(self.from_memory("order", {"id": order_id})["data"]["amount"], "0.02")
        self.wait_until(lambda: self.shows("accounts", lambda data: self.balance(data, "USDT") == frozen),
                        "the amendment's balance push never reached memory")


class PassthroughWriteTest(AccountStreamTestCase):
    """An order placed or canceled through exchange.IO (a POST to /api/v5/trade/...) cannot be matched to its
    pushes: that key's orders, balances and positions are read from REST for ORDER_PUSH_WAIT, whenever the
    pushes come; then from memory again. A GET through exchange.IO changes nothing."""

    def io(self, verb, path, params):
        answer = self.data("__api_" + path, params, headers={"Http-Method": verb})
        self.assertEqual(answer["code"], "0", answer)
        return answer["data"]

    def assert_rest_until_the_wait_ends(self, order_ids, usdt):
        """From now until ORDER_PUSH_WAIT has passed, orders, accounts and positions are read over REST and
        show the write (the pushes, held 1 s, come in the middle); then memory shows it."""
        for step in (0, 1, plugin.ORDER_PUSH_WAIT - 1.1):
            self.clock.advance(step)
            self.assertEqual([row["id"] for row in self.rest("orders")], order_ids)
            self.assertEqual(self.balance(self.rest("accounts"), "USDT"), usdt)
            self.assertEqual(self.rest("positions"), [])
        self.clock.advance(0.2)
        self.pushes_heard()
        self.assertEqual([row["id"] for row in self.from_memory("orders")["data"]], order_ids)
        self.assertEqual(self.balance(self.from_memory("accounts")["data"], "USDT"), usdt)

    def test_an_order_placed_and_canceled_through_exchange_io_shows_at_once(self):
        self.warm_up()
        self.io("GET", "/api/v5/trade/orders-pending", {"instType": "SPOT"})
        self.assertEqual(self.memory("orders"), [])
        self.pushes_heard()
        self.okx_stream.push_delay_s = 1
        row, = self.io("POST", "/api/v5/trade/order", {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy",
                                                       "ordType": "limit", "px": "30000", "sz": "0.01"})
        order_id = "BTC-USDT," + row["ordId"]
        self.assert_rest_until_the_wait_ends([order_id], (9700, 300))
        self.pushes_heard()
        row, = self.io("POST", "/api/v5/trade/cancel-order", {"instId": "BTC-USDT", "ordId": row["ordId"]})
        self.assertEqual(row["sCode"], "0")
        self.assertEqual(self.rest("order", {"id": order_id})["status"], "canceled")
        self.assert_rest_until_the_wait_ends([], (10000, 0))
        self.assertEqual(self.memory("order", {"id": order_id})["status"], "canceled")


class OverduePushTest(AccountStreamTestCase):
    """Writes whose pushes never come are awaited ORDER_PUSH_WAIT at most, whatever is read meanwhile: a
    robot that reads only balances or positions gets them from memory again then, and the writes are
    forgotten (the open orders read again)."""

    def test_balances_and_positions_return_to_memory_when_order_pushes_never_come(self):
        self.warm_up()
        self.pushes_heard()
        self.okx_stream.push_delay_s = 600                             # no push within the test
        stream = self.account_stream()
        pushed = self.balance(self.memory("accounts"), "USDT")
        ids = [self.place(price=str(30000 - n)) for n in range(10)]
        ids.append(self.place("BTC_USDT.swap", "buy", "30000", "1"))
        self.assertEqual(len(stream._awaited), 11)
        self.assertLess(self.balance(self.rest("accounts"), "USDT")[0], pushed[0])
        self.assertEqual(self.rest("positions"), [])
        self.clock.advance(plugin.ORDER_PUSH_WAIT + 0.1)
        self.wait_until(lambda: stream.status()["live"], "the stream did not answer the ping")
        # memory is as current as OKX's pushes: it shows the balance last pushed (README: Known limits)
        self.assertEqual(self.balance(self.from_memory("accounts")["data"], "USDT"), pushed)
        self.assertEqual(self.from_memory("positions")["data"], [])
        self.assertEqual(stream._awaited, {})
        self.wait_until(lambda: any("no push for order" in line for line in LOGS.lines), "no warning")
        self.wait_until(lambda: stream.status()["synced"]["orders"], "open orders were not read again")
        self.assertEqual(sorted(stream._orders), sorted(order_id.split(",")[1] for order_id in ids))

    def test_orders_read_again_replace_the_answer_memory_kept(self):
        # Answers are kept until the next message; reading the open orders again (a write's push overdue)
        # changes them too, so what `orders` answered before it (here without the new order) is dropped.
        self.warm_up()                                                 # memory answered orders: []
        self.pushes_heard()
        self.okx_stream.push_delay_s = 600
        stream = self.account_stream()
        order_id = self.place()
        self.clock.advance(plugin.ORDER_PUSH_WAIT + 0.1)
        self.wait_until(lambda: stream.status()["live"], "the stream did not answer the ping")
        self.rest("orders")                                            # overdue: the open orders are read again
        self.wait_until(lambda: stream.status()["synced"]["orders"], "open orders were not read again")
        self.assertEqual([row["id"] for row in self.from_memory("orders")["data"]], [order_id])

    def end_orders_subscription(self):
        """OKX ends the orders subscription (channel-conn-count-error): no orders push comes any more."""
        stream = self.account_stream()
        with self.okx_stream._lock:
            for conn in self.okx_stream._conns:
                if conn.path == PRIVATE_PATH and conn.api_key == KEY:
                    conn.private_subs = [arg for arg in conn.private_subs if arg["channel"] != "orders"]
        self.send_private({"event": "channel-conn-count-error", "channel": "orders", "connCount": "30"})
        self.wait_until(lambda: "orders" not in stream.status()["subscriptions"], "orders still subscribed")
        return stream

    def test_writes_are_not_awaited_while_the_orders_channel_is_read_over_rest(self):
        self.warm_up()
        self.pushes_heard()
        stream = self.end_orders_subscription()
        self.okx_stream.push_delay_s = 1
        ids = [self.place(price=str(30000 - n)) for n in range(10)]
        self.assertEqual(stream._awaited, {})                         # no push can come: nothing waits for one
        self.assertEqual(sorted(row["id"] for row in self.rest("orders")), sorted(ids))
        self.clock.advance(plugin.ORDER_PUSH_WAIT - 1)
        self.pushes_heard()                                            # the balance push, and the wait is over
        self.assertEqual(self.balance(self.memory("accounts"), "USDT"), (Decimal("7000.45"), Decimal("2999.55")))
        self.assertEqual(len(self.rest("orders")), 10)

    def test_balances_show_a_write_at_once_while_the_orders_channel_is_read_over_rest(self):
        # No order push can come, so nothing awaits one; but the balance push of the write still does, and
        # until it comes (ORDER_PUSH_WAIT at most) balances are read over REST: the frozen USDT shows at once.
        self.warm_up()
        self.pushes_heard()
        self.end_orders_subscription()
        self.okx_stream.push_delay_s = 1
        self.place()
        self.assertEqual(self.balance(self.data("accounts"), "USDT"), (9700, 300))


class AccountStreamLossTest(AccountStreamTestCase):
    """A killed, silent or ending private connection never gives a stale answer; it comes back, logs in again
    and resyncs; a channel OKX ends goes to REST."""

    def test_a_killed_connection_gives_rest_answers_then_logs_in_again_and_resyncs(self):
        order_id = self.place()
        self.warm_up()
        stream = self.account_stream()
        self.okx_stream.bad_accept = True                # reconnecting fails until the test lets it
        self.okx_stream.kill_connections()
        self.wait_until(lambda: not stream.status()["live"] and self.clock.waiting(), "the loss went unnoticed")
        self.fake.set_balance("ETH", "7")                # changes nobody pushes
        self.fake.fill(order_id.split(",")[1])
        self.assertEqual(self.balance(self.rest("accounts"), "ETH"), (7, 0))
        self.assertEqual(self.rest("order", {"id": order_id})["status"], "filled")
        self.assertEqual(self.rest("orders"), [])
        self.assertEqual(self.rest("positions"), [])
        self.okx_stream.bad_accept = False
        self.clock.advance(plugin.STREAM_BACKOFF_FIRST)
        self.wait_until(lambda: self.logins() == ["0", "0"], "no second login")
        self.assertEqual(self.balance(self.from_memory("accounts")["data"], "ETH"), (7, 0))
        self.assertEqual(self.from_memory("orders")["data"], [])
        self.assertEqual(stream.status()["reconnects"], 1)
        self.assertEqual(self.okx_stream.open_private_connections, 1)

    def test_a_silent_connection_is_left_to_rest_within_the_freshness_window(self):
        self.warm_up()
        self.okx_stream.answer_pings = False
        self.fake.set_balance("ETH", "7")                # its push is lost: the server is silent
        pings = self.okx_stream.pings_received
        self.clock.advance(plugin.STREAM_FRESH_SECONDS)
        self.assertEqual(self.balance(self.rest("accounts"), "ETH"), (7, 0))
        self.rest("orders")
        self.wait_until(lambda: self.okx_stream.pings_received > pings, "no ping")     # unanswered
        self.okx_stream.answer_pings = True
        self.clock.advance(plugin.STREAM_DEAD_AFTER - plugin.STREAM_FRESH_SECONDS + 0.1)    # given up
        self.wait_until(lambda: self.logins() == ["0", "0"], "no second login")
        self.assertEqual(self.balance(self.from_memory("accounts")["data"], "ETH"), (7, 0))
        self.from_memory("orders")

    def test_notice_64008_reconnects_and_resyncs(self):
        self.warm_up()
        self.okx_stream.send_notice_64008()
        self.wait_until(lambda: self.logins() == ["0", "0"], "no second login after 64008")
        self.fake.set_balance("ETH", "9")
        self.wait_until(lambda: self.shows("accounts", lambda data: self.balance(data, "ETH") == (9, 0)),
                        "the change after the reconnection never reached memory")
        self.from_memory("orders")
        self.assertTrue(any("64008" in line for line in LOGS.lines))

    def test_channel_conn_count_error_leaves_that_channel_to_rest(self):
        self.warm_up()
        stream = self.account_stream()
        self.send_private({"event": "channel-conn-count-error", "channel": "orders", "connCount": "30"})
        self.wait_until(lambda: "orders" not in stream.status()["subscriptions"], "orders still subscribed")
        for _ in range(3):
            self.rest("orders")
            self.memory("accounts")
            self.memory("positions")
        self.assertTrue(any("orders subscription" in line and "REST" in line for line in LOGS.lines))


class RefusedLoginTest(AccountStreamTestCase):
    """A login OKX refuses leaves the key to REST, says why in the log, and is tried again rarely."""

    def test_a_wrong_passphrase_is_retried_rarely_while_rest_answers(self):
        self.okx_stream.refuse_logins = "60024"
        started, login_times = self.clock.monotonic(), []
        for _ in range(60):                              # ten minutes, a read every 10 s
            self.assertEqual(self.balance(self.rest("accounts"), "USDT"), (10000, 0))
            self.wait_until(lambda: self.stream_thread_done(), "the stream thread did not end")
            login_times += [self.clock.monotonic() - started] * (len(self.logins()) - len(login_times))
            self.wait_until(lambda: self.okx_stream.open_private_connections == 0, "a refused connection stays open")
            self.clock.advance(10)
        self.assertEqual(self.logins(), ["60024"] * len(login_times))
        gaps = [later - earlier for earlier, later in zip(login_times, login_times[1:])]
        self.assertEqual(login_times[0], 0)
        self.assertEqual(gaps[0], plugin.LOGIN_RETRY_FIRST)
        self.assertTrue(all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps)
        self.assertLessEqual(len(login_times), 6)
        status = self.account_stream().status()
        self.assertEqual((status["login"], status["live"]), ("refused (60024)", False))
        refusals = [line for line in LOGS.lines if "OKX refused the login (60024: Wrong passphrase" in line]
        self.assertEqual(len(refusals), len(login_times))
        self.assertIn("read over REST", refusals[0])

    def test_a_key_of_another_site_and_a_demo_key_on_the_live_host_fall_back_to_rest(self):
        cases = (("60032", KEY, SECRET_FIELD, "API key doesn't exist", "10000"),
                 ("50101", DEMO_KEY, DEMO_SECRET_FIELD, "APIKey does not match current environment.", "100000"))
        for code, key, secret_field, message, usdt in cases:
            with self.subTest(code=code):
                self.okx_stream.refuse_logins = code if code == "60032" else None
                self.use_plugin()
                del LOGS.lines[:]
                fields = {"access_key": key, "secret_key": secret_field}
                self.assertEqual(self.balance(self.rest("accounts", **fields), "USDT"), (Decimal(usdt), 0))
                self.wait_until(lambda: self.stream_thread_done(key), "the stream thread did not end")
                self.assertEqual(self.logins(key)[-1], code)
                logged = len(self.logins(key))
                for _ in range(5):
                    self.clock.advance(5)
                    self.rest("accounts", **fields)
                    self.rest("orders", **fields)
                self.assertEqual(len(self.logins(key)), logged)               # no new login within 25 s
                self.wait_until(lambda: self.okx_stream.open_private_connections == 0, "a refused connection is open")
                refusal = [line for line in LOGS.lines if "OKX refused the login (%s: %s" % (code, message) in line]
                self.assertEqual(len(refusal), 1, LOGS.lines)
                if code == "50101":
                    self.assertIn(plugin.ERROR_HINTS["50101"], refusal[0])
                self.clock.advance(10)

    def test_a_refused_login_has_the_hint_of_its_rest_twin(self):
        for code, twin in (("60024", "50105"), ("60032", "50119")):
            with self.subTest(code=code):
                self.okx_stream.refuse_logins = code
                self.use_plugin()
                self.rest("accounts")
                self.wait_until(lambda: self.logins()[-1:] == [code], "no refused login")
                self.wait_until(lambda: any("(%s:" % code in line for line in LOGS.lines), "no refusal logged")
                self.assertTrue(any("(%s:" % code in line and plugin.ERROR_HINTS[twin] in line for line in LOGS.lines))


class RefusedLoginMessageTest(AccountStreamTestCase):
    """OKX's message about a refused login may repeat the login request (60012 "Invalid request: {...}") or
    name the key or the passphrase: the log (at debug level) and GET /status keep OKX's code and show none
    of it."""

    def refused_with(self, message_of):
        """Serve the rest of the test from a new plugin whose logins OKX refuses with 60012 and the message
        ``message_of(login request text, its args)``; returns the log line of the refusal."""
        refusal = lambda conn, args, arg, text: ("60012", message_of(text, arg))
        patcher = mock.patch.object(self.okx_stream, "_login_refusal", refusal)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.use_plugin()
        del LOGS.lines[:]
        self.assertEqual(self.balance(self.rest("accounts"), "USDT"), (10000, 0))
        self.wait_until(lambda: self.logins()[-1:] == ["60012"] and self.stream_thread_done(), "no refused login")
        refusals = [line for line in LOGS.lines if "OKX refused the login (60012: " in line]
        self.assertEqual(len(refusals), 1, LOGS.lines)
        return refusals[0]

    def assert_nothing_secret_shown(self):
        """No log line and no GET /status shows the key, the secret, the passphrase or a login's signature."""
        signs = [request["args"][0]["sign"] for request in self.okx_stream.received
                 if isinstance(request, dict) and request.get("op") == "login"]
        self.assertTrue(signs)
        response, status = self.get("/status")
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(status)["exchanges"]["okx"]["streams"]["account"][0]["login"], "refused (60012)")
        for secret in [KEY, SECRET, PASSPHRASE] + signs:
            self.assertEqual([line for line in LOGS.lines if secret in line], [], secret[:6])
            self.assertNotIn(secret, status)

    def test_a_repeated_login_request_is_not_logged(self):
        line = self.refused_with(lambda text, arg: "Invalid request: " + text)
        self.assertIn("OKX refused the login (60012: Invalid request (OKX repeated the login request: not shown); "
                      "this key is read over REST", line)
        self.assert_nothing_secret_shown()

    def test_a_key_or_passphrase_in_the_message_is_masked(self):
        line = self.refused_with(lambda text, arg: "Wrong passphrase %s for apiKey %s" % (arg["passphrase"],
                                                                                           arg["apiKey"]))
        self.assertIn("OKX refused the login (60012: Wrong passphrase *** for apiKey ***; this key is read", line)
        self.assert_nothing_secret_shown()

    def test_a_signature_in_the_message_is_not_logged(self):
        # A message that repeats the login's args alone, or its sign, must not log the signature either
        # (OKX accepts it again for its 30 s).
        for message_of in (lambda text, arg: "Invalid sign: " + arg["sign"],
                           lambda text, arg: "Invalid request: " + json.dumps(arg)):
            self.refused_with(message_of)
            self.assert_nothing_secret_shown()


class ClockRefusedLoginTest(AccountStreamTestCase):
    """OKX's 60006 (the login's timestamp expired): OKX's clock is read again and the login tried again after
    1 s the first time, then with the growing wait of any refused login, never once a second."""

    def test_60006_again_and_again_is_retried_ever_more_rarely(self):
        self.okx_stream.refuse_logins = "60006"
        first = plugin.LOGIN_RETRY_FIRST
        wanted = [0, 1, 1 + 2 * first, 1 + 6 * first]            # after 1 s, then 2x and 4x the first wait
        started, login_times, syncs = self.clock.monotonic(), [], []
        for at in sorted(set(wanted + [2, 10, first, 2 * first, 2 + 2 * first, 4 * first, 6 * first, 2 + 6 * first])):
            self.clock.advance(started + at - self.clock.monotonic())
            self.assertEqual(self.balance(self.rest("accounts"), "USDT"), (10000, 0))
            self.wait_until(lambda: self.stream_thread_done(), "the stream thread did not end")
            login_times += [at] * (len(self.logins()) - len(login_times))
            syncs.append(len(self.okx_calls("/api/v5/public/time")))
        self.assertEqual(login_times, wanted)
        self.assertEqual(self.logins(), ["60006"] * len(wanted))
        self.assertEqual(syncs[-1], 1 + len(wanted))             # the first signed call's, and one per 60006
        waits = [re.search(r"next login in (\d+) s", line).group(1) for line in LOGS.lines
                 if "OKX refused the login (60006: Timestamp request expired" in line]
        self.assertEqual(waits, ["1", "%d" % (2 * first), "%d" % (4 * first), "%d" % (8 * first)])


class AccountKeysTest(AccountStreamTestCase):
    """Each key's reads are answered from that key's own connection only."""

    def test_two_keys_never_see_each_others_balances_positions_or_orders(self):
        other = self.other_docker()
        mine = self.place()
        theirs = [self.place_as(other, "BTC_USDT", "buy", "31000", "0.002"),
                  self.place_as(other, "LTC_USDT", "sell", "90", "1")]
        self.warm_up()
        self.warm_up(docker=other)
        rest_mine = self.rest_docker()
        rest_theirs = self.rest_docker(access_key=OTHER_KEY, secret_key=OTHER_SECRET_FIELD)
        self.assertEqual(self.okx_stream.open_private_connections, 2)
        for docker, rest in ((self.docker, rest_mine), (other, rest_theirs)):
            for method in ("accounts", "positions", "orders"):
                with self.subTest(key=docker.access_key[:4], method=method):
                    self.assertEqual(self.memory(method, docker=docker), rest.call(method)["data"])
        self.assertEqual([row["id"] for row in self.memory("orders")], [mine])
        self.assertEqual([row["id"] for row in self.memory("orders", docker=other)], theirs[::-1])
        self.assertEqual(self.balance(self.memory("accounts", docker=other), "USDT"), (715, 62))
        self.assertEqual(self.balance(self.memory("accounts"), "USDT"), (9700, 300))
        self.assertIn("51603", self.error("order", {"id": theirs[0]}))     # REST's answer: not this key's order
        self.pushes_heard()
        self.place_as(other, "BTC_USDT.swap", "buy", "-1", "1")            # a position of theirs only
        self.assertEqual(len(self.from_memory("positions", docker=other)["data"]), 1)
        self.assertEqual(self.memory("positions"), [])
        self.assertEqual(self.memory("orders"), rest_mine.call("orders")["data"])
        self.assertEqual(self.memory("accounts"), rest_mine.call("accounts")["data"])
        keys = sorted(s["key"] for s in self.server.status()["exchanges"]["okx"]["streams"]["account"])
        self.assertEqual(keys, sorted([KEY[:4] + "...", OTHER_KEY[:4] + "..."]))

    def test_a_wrong_secret_for_a_known_key_is_refused_as_over_rest(self):
        self.warm_up()
        self.assertIn("50113", self.error("accounts", secret_key="not-the-secret," + PASSPHRASE))
        self.assertIn("50105", self.error("orders", secret_key=SECRET + ",not-the-passphrase"))
        self.memory("accounts")                                            # the real key: memory as before
        self.okx_stream.kill_connections()
        self.wait_until(lambda: len(self.logins()) == 2, "no second login")
        self.assertEqual(self.logins(), ["0", "0"])


class AccountStreamFlagsTest(AccountStreamTestCase):
    """--stream-idle closes an unread key's connection; --no-stream and --no-private-stream read over REST."""

    def test_an_unread_key_closes_its_connection_and_the_next_read_opens_it(self):
        self.use_plugin(stream_idle=2)
        self.warm_up()
        for _ in range(2):                               # a read within stream_idle keeps it open
            self.clock.advance(1.5)
            self.from_memory("accounts")
        self.assertEqual(self.okx_stream.open_private_connections, 1)
        self.clock.advance(2.1)
        self.wait_until(lambda: self.okx_stream.open_private_connections == 0, "still open after stream_idle")
        self.wait_until(lambda: self.stream_thread_done(), "the stream thread did not end")
        self.assertEqual(self.logins(), ["0"])           # closed, not reconnected
        self.assertFalse(self.account_stream().status()["live"])
        self.rest("accounts")                            # the first read after the close: REST, and it opens
        self.warm_up()
        self.assertEqual((self.logins(), self.okx_stream.open_private_connections), (["0", "0"], 1))

    def test_no_stream_and_no_private_stream_read_every_account_over_rest(self):
        order_id = self.place()
        for options in ({"stream": False}, {"private_stream": False}):
            with self.subTest(**options):
                self.use_plugin(**options)
                for _ in range(3):
                    for method, params in (("accounts", None), ("assets", None), ("positions", None),
                                           ("orders", None), ("orders", {"symbol": "BTC_USDT"}),
                                           ("order", {"id": order_id})):
                        self.rest(method, params)
                self.assertIsNone(self.account_stream())
                if options.get("stream") is False:
                    self.rest("ticker", {"symbol": "BTC_USDT"})
                    self.rest("ticker", {"symbol": "BTC_USDT"})
                else:                                    # the market stream works without the private one
                    self.from_memory("ticker", {"symbol": "BTC_USDT"})
        self.assertEqual(self.okx_stream.logins, [])
        self.assertEqual(self.okx_stream.open_private_connections, 0)
        self.assertEqual(self.okx_stream.connections_total, 1)      # the public one
        parser = plugin.build_parser()
        for flags, wanted in (([], (True, True)), (["--no-private-stream"], (True, False)),
                              (["--no-stream"], (False, False))):
            config = plugin.config_from_args(parser.parse_args(flags), parser)
            self.assertEqual((config.stream, config.private_stream), wanted, flags)


class AccountSecretsTest(AccountStreamTestCase):
    """Over a whole session at debug level, no log line holds a secret, a passphrase or a signature."""

    def test_no_secret_passphrase_or_signature_is_ever_logged(self):
        self.warm_up()
        order_id = self.place()
        self.from_memory("order", {"id": order_id})
        self.data("cancel", {"id": order_id})
        self.place("BTC_USDT.swap", "buy", "-1", "1")
        self.from_memory("positions")
        self.clock.advance(1)
        self.okx_stream.kill_connections()                          # reconnect: a second login
        self.wait_until(lambda: self.logins() == ["0", "0"], "no second login")
        self.warm_up()
        self.clock.advance(1)
        self.okx_stream.refuse_logins = "60024"                     # and a refused one
        self.okx_stream.kill_connections()
        self.wait_until(self.clock.waiting, "no backoff")         # the last connection did not last
        self.clock.advance(plugin.STREAM_BACKOFF_FIRST)
        self.wait_until(lambda: self.logins()[-1:] == ["60024"], "no refused login")
        self.rest("accounts")
        self.clock.advance(1)
        self.okx_stream.refuse_logins = None
        self.rest("accounts", access_key=DEMO_KEY, secret_key=DEMO_SECRET_FIELD)      # refused: 50101
        self.error("accounts", secret_key="not-the-secret," + PASSPHRASE)
        self.error("accounts", access_key=OTHER_KEY, secret_key=OTHER_SECRET_FIELD)   # a key OKX does not know
        for key, code in ((DEMO_KEY, "50101"), (OTHER_KEY, "60032")):
            self.wait_until(lambda: self.logins(key) == [code] and self.stream_thread_done(key), "no %s login" % code)
        logins = [request["args"][0] for request in self.okx_stream.received
                  if isinstance(request, dict) and request.get("op") == "login"]
        self.assertEqual(len(logins), 5)
        signs = set()
        for login in logins:                             # the signatures, computed as OKX checks them
            secret = {KEY: SECRET, DEMO_KEY: DEMO_SECRET, OTHER_KEY: OTHER_SECRET}[login["apiKey"]]
            self.assertEqual(login["sign"], ws_login_sign(secret, login["timestamp"]))
            signs.add(login["sign"])
        signs.update(r["headers"]["OK-ACCESS-SIGN"] for r in self.fake.requests if "OK-ACCESS-SIGN" in r["headers"])
        self.assertGreater(len(signs), 10)
        secrets = [SECRET, PASSPHRASE, DEMO_SECRET, DEMO_PASSPHRASE, OTHER_SECRET, OTHER_PASSPHRASE] + sorted(signs)
        self.assertGreater(len(LOGS.lines), 30)
        leaks = [(secret[:6], line) for line in LOGS.lines for secret in secrets if secret in line]
        self.assertEqual(leaks, [])
        self.assertTrue(any("account stream 6f1d..." in line for line in LOGS.lines))


class StatusPageTest(AccountStreamTestCase):
    """GET /status: what the plugin is doing, as the test did it, and nothing secret."""

    def test_status_shows_streams_limits_and_calls_without_secrets(self):
        done = collections.defaultdict(lambda: {"calls": 0, "errors": 0, "okx_requests": 0})
        memory_answers = 0

        def call(method, params=None, until_memory=False):
            """A call counted as GET /status should count it (the stream's own reads of open orders aside)."""
            nonlocal memory_answers
            while True:
                answer, requests = self.call(method, params)
                requests = [r for r in requests if r["path"] != "/api/v5/trade/orders-pending"]
                done[method]["calls"] += 1
                done[method]["errors"] += "error" in answer
                done[method]["okx_requests"] += len(requests)
                memory_answers += not requests and method != "ticker" and "error" not in answer
                if not until_memory or not requests:
                    return answer
                time.sleep(0.002)
        # trade first: its signed call reads OKX's clock before the stream (whose thread could read it too)
        order = {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.01"}
        order_id = call("trade", order)["data"]["id"]
        call("ticker", {"symbol": "ETH_USDT"}, until_memory=True)
        call("accounts", until_memory=True)
        for _ in range(4):
            call("accounts")
        stream = self.account_stream()
        self.wait_until(lambda: stream.status()["synced"]["orders"], "open orders not read")
        self.assertEqual([row["id"] for row in call("orders")["data"]], [order_id])
        call("cancel", {"id": order_id})
        self.assertIn("51603", call("order", {"id": "BTC-USDT,1234"})["error"])
        self.assertEqual(done["order"], {"calls": 1, "errors": 1, "okx_requests": 1})
        self.assertEqual(done["orders"], {"calls": 1, "errors": 0, "okx_requests": 0})
        self.clock.advance(0.5)
        response, text = self.get("/status")
        self.assertEqual((response.status, response.getheader("Content-Type")), (200, "application/json"))
        status = json.loads(text)
        self.assertEqual((status["version"], status["uptime_s"]), (plugin.__version__, 0.5))
        okx = status["exchanges"]["okx"]
        self.assertEqual(okx["api_base"], self.fake.base_url)
        market, = okx["streams"]["market"]
        self.assertTrue(market["live"])
        self.assertIn("ETH-USDT", " ".join(market["subscriptions"]))
        account, = okx["streams"]["account"]
        self.assertEqual({name: account[name] for name in ("key", "demo", "live", "login", "subscriptions",
                                                          "synced", "reconnects")},
                         {"key": "6f1d...", "demo": False, "live": True, "login": "ok",
                          "subscriptions": ["account", "orders", "positions"],
                          "synced": {"account": True, "positions": True, "orders": True}, "reconnects": 0})
        self.assertTrue(0 <= account["last_message_age"] <= 0.5, account)
        self.assertGreaterEqual(account["served_from_memory"], memory_answers)
        self.assertGreaterEqual(memory_answers, 6)
        for endpoint in ("GET /api/v5/account/balance", "POST /api/v5/trade/order", "POST /api/v5/trade/cancel-order",
                         "GET /api/v5/trade/order"):
            self.assertEqual(okx["rate_limit_buckets"].get(endpoint), 1, (endpoint, okx["rate_limit_buckets"]))
        paths = collections.Counter(request["path"] for request in self.fake.requests)
        self.assertEqual(okx["okx_requests"], dict(paths))
        background = paths["/api/v5/trade/orders-pending"] - done["orders"]["okx_requests"]
        self.assertGreaterEqual(background, 1)                             # the stream's read of open orders
        wanted = dict(done, **{"(background)": {"calls": 0, "errors": 0, "okx_requests": background}})
        self.assertEqual(status["methods"], wanted)
        for secret in [SECRET, PASSPHRASE, KEY] + [r["headers"]["OK-ACCESS-SIGN"] for r in self.fake.requests
                                                    if "OK-ACCESS-SIGN" in r["headers"]] + [
                request["args"][0]["sign"] for request in self.okx_stream.received
                if isinstance(request, dict) and request.get("op") == "login"]:
            self.assertNotIn(secret, text)
        self.clock.advance(2.5)                                            # every rate window has passed
        self.assertNotIn("GET /api/v5/account/balance", json.loads(self.get("/status")[1])
                         ["exchanges"]["okx"]["rate_limit_buckets"])

    def test_other_get_paths_keep_the_json_error(self):
        self.assertEqual(json.loads(self.get("/status/")[1])["version"], plugin.__version__)
        for path in ("/", "/OKX", "/OKX/status", "/statuses", "/status/x"):
            with self.subTest(path=path):
                response, text = self.get(path)
                self.assertEqual(response.status, 200)
                self.assertEqual(list(json.loads(text)), ["error"])
                self.assertIn("only POST is supported", json.loads(text)["error"])
                self.assertEqual(response.getheader("Connection"), "close")


class StatusPerExchangeTest(unittest.TestCase):
    """GET /status holds each exchange's own part (``status()`` of its shared state); an exchange whose
    shared state has none shows an empty part, and the page still answers."""

    def test_an_exchange_without_a_status_shows_an_empty_part(self):
        class SharedWithoutStatus:
            def __init__(self, config):
                self.config = config

            def close(self):
                pass
        with mock.patch.dict(plugin.EXCHANGES, {"other": (plugin.OKX, SharedWithoutStatus)}):
            server = plugin.PluginServer(("127.0.0.1", 0), plugin.Config(api_base="https://www.okx.com",
                                                                         clock=VirtualClock()))
        self.addCleanup(server.server_close)
        status = server.status()
        self.assertEqual(status["exchanges"]["other"], {})
        self.assertEqual(status["exchanges"]["okx"]["api_base"], "https://www.okx.com")
        self.assertEqual(status["exchanges"]["okx"]["streams"], {"market": [], "account": []})


class AccountStreamMemoryRulesTest(unittest.TestCase):
    """An AccountStream fed OKX's messages directly: OKX's rules against duplicate and out-of-order pushes,
    and paged snapshots."""

    @staticmethod
    def rows(answer):
        """The rows of a read of the stream (it answers rows and their JSON), or None."""
        return None if answer is None else answer[0]

    INST = "BTC-USDT"

    def setUp(self):
        self.clock = VirtualClock()
        credentials = plugin.Credentials(KEY, SECRET, PASSPHRASE)
        self.stream = plugin.AccountStream("ws://127.0.0.1:9", self.clock, credentials,
                                           plugin.ExchangeClock(self.clock), load_open_orders=lambda: [])
        self.stream._ensure_thread = lambda: None           # no connection: the test is OKX
        self.addCleanup(self.stream.close)
        with self.stream._lock:
            self.stream._connected, self.stream._heard_at = True, self.clock.monotonic()
            self.stream._asked_at = self.clock.monotonic()
            for arg in plugin.ACCOUNT_CHANNELS:
                self.stream._channels[arg["channel"]] = "live"
            self.stream._synced["orders"] = True

    def push(self, channel, rows, **fields):
        arg = {"channel": channel, "uid": "44705892343619584"}
        with self.stream._lock:
            self.stream._on_message(dict({"arg": arg, "data": rows}, **fields), self.clock.monotonic())

    def order_row(self, ord_id, state, filled, utime, **fields):
        row = {"instType": "SPOT", "instId": self.INST, "ordId": ord_id, "state": state, "accFillSz": filled,
               "sz": "1", "px": "30000", "side": "buy", "avgPx": "30000" if Decimal(filled) else "0",
               "uTime": str(utime), "fillSz": "0", "execType": "", "code": "0", "msg": ""}
        row.update(fields)
        return row

    def test_duplicates_and_late_pushes_never_undo_a_fill_or_a_final_state(self):
        pushes = [("live", "0", 1), ("partially_filled", "0.4", 3), ("live", "0", 2), ("partially_filled", "0.2", 2),
                  ("partially_filled", "0.4", 4), ("filled", "1", 6), ("partially_filled", "0.6", 5),
                  ("live", "0", 9), ("canceled", "0", 10), ("filled", "1", 6)]
        seen = []
        for state, filled, utime in pushes:
            self.push("orders", [self.order_row("1", state, filled, utime)])
            row = self.rows(self.stream.order(self.INST, "1"))
            seen.append((row["state"], row["accFillSz"]))
        self.assertEqual(seen, [("live", "0"), ("partially_filled", "0.4"), ("partially_filled", "0.4"),
                                ("partially_filled", "0.4"), ("partially_filled", "0.4")] + [("filled", "1")] * 5)
        self.assertEqual(self.rows(self.stream.open_orders()), [])
        self.push("orders", [self.order_row("2", "canceled", "0", 5, sz="2")])
        self.push("orders", [self.order_row("2", "live", "0", 4, sz="2"), self.order_row("2", "live", "0", 6, sz="2")])
        self.assertEqual(self.rows(self.stream.order(self.INST, "2"))["state"], "canceled")
        self.assertEqual(self.rows(self.stream.open_orders(self.INST)), [])
        row = self.rows(self.stream.order(self.INST, "1"))                        # REST's row: no push-only fields
        self.assertNotIn("execType", row)
        self.assertEqual(row["avgPx"], "30000")

    def test_a_paged_snapshot_counts_once_its_last_page_came(self):
        def position(inst_id, pos, utime=1):
            return {"instType": "SWAP", "instId": inst_id, "posId": inst_id, "mgnMode": "cross", "posSide": "net",
                    "pos": pos, "uTime": str(utime), "pTime": "7"}
        self.push("positions", [position("BTC-USDT-SWAP", "1"), position("ETH-USDT-SWAP", "2")],
                  eventType="snapshot", curPage=1, lastPage=False)
        self.assertIsNone(self.rows(self.stream.positions()))                     # not in sync before the last page
        self.push("positions", [position("LTC-USDT-SWAP", "3")], eventType="snapshot", curPage=2, lastPage=True)
        self.assertEqual([(p["instId"], p["pos"]) for p in self.rows(self.stream.positions())],
                         [("BTC-USDT-SWAP", "1"), ("ETH-USDT-SWAP", "2"), ("LTC-USDT-SWAP", "3")])
        self.assertNotIn("pTime", self.rows(self.stream.positions())[0])
        self.push("positions", [position("BTC-USDT-SWAP", "5", 3)], eventType="snapshot", curPage=1, lastPage="false")
        self.assertEqual(len(self.rows(self.stream.positions())), 3)              # a regular snapshot's first page: held
        self.push("positions", [position("ETH-USDT-SWAP", "0", 3)], eventType="event_update")   # closed
        self.assertEqual([p["instId"] for p in self.rows(self.stream.positions())], ["BTC-USDT-SWAP", "LTC-USDT-SWAP"])
        self.push("positions", [], eventType="snapshot", curPage=2, lastPage=True)
        self.assertEqual([(p["instId"], p["pos"]) for p in self.rows(self.stream.positions())], [("BTC-USDT-SWAP", "5")])
        self.push("positions", [position("BTC-USDT-SWAP", "4", 2)], eventType="event_update")   # older: dropped
        self.assertEqual(self.rows(self.stream.positions())[0]["pos"], "5")

    def test_an_older_balance_push_is_dropped_and_pages_are_collected(self):
        def detail(ccy, avail, utime):
            return {"ccy": ccy, "availBal": avail, "frozenBal": "0", "eq": avail, "cashBal": avail, "uTime": str(utime)}
        self.push("account", [{"totalEq": "1", "details": [detail("BTC", "1", 5)]}], eventType="snapshot",
                  curPage=1, lastPage=False)
        self.assertIsNone(self.rows(self.stream.balance()))
        self.push("account", [{"totalEq": "2", "details": [detail("USDT", "10", 5)]}], eventType="snapshot",
                  curPage=2, lastPage=True)
        balance, = self.rows(self.stream.balance())
        self.assertEqual((balance["totalEq"], [d["ccy"] for d in balance["details"]]), ("2", ["BTC", "USDT"]))
        self.push("account", [{"totalEq": "3", "details": [detail("BTC", "0.5", 4), detail("USDT", "11", 6)]}],
                  eventType="event_update")
        balance, = self.rows(self.stream.balance())
        self.assertEqual([(d["ccy"], d["availBal"]) for d in balance["details"]], [("BTC", "1"), ("USDT", "11")])

    def test_of_two_pushes_in_one_state_the_later_change_wins(self):
        # An amendment changes price or size, not the state: a late push of the row before it must not
        # bring the old price back, partly filled or not.
        pushes = [("live", "0", 5, "30001"), ("live", "0", 4, "30000"), ("live", "0", 5, "30001"),
                  ("partially_filled", "0.4", 7, "30002"), ("partially_filled", "0.4", 6, "30001"),
                  ("partially_filled", "0.4", 8, "30003")]
        seen = []
        for state, filled, utime, price in pushes:
            self.push("orders", [self.order_row("3", state, filled, utime, px=price)])
            row = self.rows(self.stream.order(self.INST, "3"))
            seen.append((row["state"], row["px"], row["uTime"]))
        self.assertEqual(seen, [("live", "30001", "5")] * 3 + [("partially_filled", "30002", "7")] * 2 +
                         [("partially_filled", "30003", "8")])
        self.assertEqual([row["px"] for row in self.rows(self.stream.open_orders(self.INST))], ["30003"])

    def test_an_amended_order_holds_balances_until_their_push(self):
        # An amendment's push changes the price or the size, not the state nor the fill; OKX's balance push
        # (the frozen amount) follows it. Until then, at most ORDER_PUSH_WAIT, balances are left to REST.
        def balance(utime):
            return [{"totalEq": "1", "details": [{"ccy": "USDT", "availBal": "9700", "frozenBal": "300",
                                                  "uTime": str(utime)}]}]
        self.push("account", balance(1), eventType="snapshot", curPage=1, lastPage=True)
        self.push("orders", [self.order_row("4", "live", "0", 1, sz="0.01")])
        self.push("account", balance(2), eventType="event_update")
        self.assertIsNotNone(self.rows(self.stream.balance()))
        for utime, price, size in ((3, "30001", "0.01"), (4, "30001", "0.02")):     # the price, then the size
            self.push("orders", [self.order_row("4", "live", "0", utime, px=price, sz=size)])
            self.assertIsNone(self.rows(self.stream.balance()), "balances answered before their push")
            self.push("account", balance(utime), eventType="event_update")
            self.assertIsNotNone(self.rows(self.stream.balance()))
        self.push("orders", [self.order_row("4", "live", "0", 5, px="30002", sz="0.02")])
        self.clock.advance(plugin.ORDER_PUSH_WAIT + 0.1)              # no balance push: the wait ends anyway
        with self.stream._lock:
            self.stream._heard_at = self.clock.monotonic()               # (the connection is alive)
        self.assertIsNotNone(self.rows(self.stream.balance()))

    def test_a_push_that_came_before_the_answer_counts_for_read_your_writes(self):
        # OKX pushes an order within milliseconds, often before its REST answer: a push that arrived while the
        # order was on its way is the order's own push (messages are ordered by arrival, not by a clock).
        stream, sent, clock = self.stream, [], self.clock
        push = json.dumps({"arg": {"channel": "orders", "instType": "ANY"},
                           "data": [self.order_row("7", "live", "0", 1)]})

        class ScriptedSocket:
            """During one wait for bytes, a robot sends an order and its push arrives; then the stream stops."""
            heard_at = clock.monotonic()

            def send_text(self, text):
                pass

            def receive(self):
                if sent:
                    stream._stop.set()
                    return []
                clock.advance(0.02)
                sent.append(True)                          # a robot's order is on its way
                self.heard_at = clock.monotonic()
                return [push]
        stream._serve(ScriptedSocket())
        stream.wrote(self.INST, "7")                       # OKX's answer, after its push
        row = self.rows(stream.order(self.INST, "7"))
        self.assertIsNotNone(row, "the order is left to REST though its push came")
        self.assertEqual(row["state"], "live")


# ---- Benchmark: python3 test_protocol.py bench [--rtt-ms 20] [--robots 8] [--calls 40] [NAME=COMMAND ...] ----

def _bench_percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def _timed_calls(docker, method, params, count):
    latencies, ok = [], 0
    for _ in range(count):
        started = time.perf_counter()
        answer = docker.call(method, params)
        latencies.append((time.perf_counter() - started) * 1000)
        ok += "data" in answer
    return latencies, ok


def bench_plugin(name, command, fake, options):
    """Start one plugin command against the fake and measure it as the docker sees it."""
    port = free_port()
    env = dict(os.environ, SSL_CERT_FILE=fake.cert_path, OKX_API_BASE=fake.base_url)
    argv = command.format(port=port, api_base=fake.base_url, python=sys.executable).split()
    result, process = {"name": name}, None
    try:
        process, start_s = _start_process(argv, port, env)
        result["start_s"] = round(start_s, 3)
        result["rss_idle_kb"] = _rss_kb(process.pid)
        docker = Docker(port)
        _timed_calls(docker, "ticker", {"symbol": "ETH_USDT"}, 3)
        connections = fake.connections
        latencies, ok = _timed_calls(docker, "ticker", {"symbol": "ETH_USDT"}, options.calls)
        result.update(ticker_p50_ms=round(_bench_percentile(latencies, 0.5), 2),
                      ticker_p90_ms=round(_bench_percentile(latencies, 0.9), 2),
                      ticker_ok="%d/%d" % (ok, options.calls),
                      upstream_conns_per_call=round((fake.connections - connections) / options.calls, 2))
        direct = bench_direct(fake, options)["ticker_p50_ms"]      # the floor again, at this moment
        result.update(direct_p50_ms=direct, ticker_vs_direct=round(result["ticker_p50_ms"] / direct, 2))
        latencies, ok = _timed_calls(docker, "accounts", {}, options.calls)
        result.update(accounts_p50_ms=round(_bench_percentile(latencies, 0.5), 2),
                      accounts_ok="%d/%d" % (ok, options.calls))
        docker.close()
        answers = []

        def robot():
            robot_docker = Docker(port)
            for _ in range(options.calls):
                answers.append("data" in robot_docker.call("ticker", {"symbol": "ETH_USDT"}))
            robot_docker.close()
        robots = [threading.Thread(target=robot) for _ in range(options.robots)]
        started, peak = time.perf_counter(), 0
        for thread in robots:
            thread.start()
        while any(thread.is_alive() for thread in robots):
            peak = max(peak, _rss_kb(process.pid) or 0)
            time.sleep(0.02)
        wall = time.perf_counter() - started
        result.update(robots=options.robots, robots_calls_per_s=round(answers.count(True) / wall, 1),
                      robots_errors=answers.count(False), rss_peak_kb=peak)
    except Exception as exc:    # report the failure in the table rather than hide the other plugins
        result["failed"] = repr(exc)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
    return result


def bench_direct(fake, options):
    """The floor: the same ticker request straight to the fake over one kept-alive TLS connection."""
    context = ssl.create_default_context(cafile=fake.cert_path)
    connection = http.client.HTTPSConnection("127.0.0.1", int(fake.base_url.rsplit(":", 1)[1]), context=context)
    latencies = []
    for n in range(options.calls + 3):
        started = time.perf_counter()
        connection.request("GET", "/api/v5/market/ticker?instId=ETH-USDT")
        connection.getresponse().read()
        if n >= 3:
            latencies.append((time.perf_counter() - started) * 1000)
    connection.close()
    return {"name": "direct", "ticker_p50_ms": round(_bench_percentile(latencies, 0.5), 2)}


_BARE_SERVER = """
import http.server, sys
BODY = b'{"data":{"symbol":"ETH_USDT","buy":"2922.18","sell":"2922.19","high":"2955","low":"2775.15",\
"open":"2787.72","last":"2922.18","vol":"249400.888156","time":1731028903911}}'
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""


def _start_process(argv, port, env=None):
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError("%s exited with %s" % (argv[1], process.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, time.monotonic() - started
        except OSError:
            if time.monotonic() - started > 10:
                process.kill()
                raise RuntimeError("%s did not listen within 10 s" % argv[1])
            time.sleep(0.005)


# Robot processes: the _ROBOT script, one OS process per robot, reads jobs (JSON lines) on stdin and prints
# one JSON line per job. It keeps one kept-alive connection per port and does as little client work as
# it can (bytes in, bytes out), so that the server's cost is what a measurement shows.
#   {"op": "loop", "port", "bodies", "nonce", "start", "seconds"}: wait for `start` (time.monotonic(), one
#       clock for every process on Linux), send `bodies` round and round until `seconds` passed; prints
#       {"ok", "errors", "samples", "seconds"} ("ok": answers starting with {"data").
#   {"op": "poll", "port", "body", "nonce", "field", "before", "timeout"}: call once and print {"ready": true},
#       then call back to back until the answer's data[field] is no longer `before`; prints {"seen": the
#       monotonic time that answer was read, "polls", "errors", "value"} ("seen" null after `timeout`).
# A body is the docker's JSON with "%d" where the nonce goes (see _robot_body).
_ROBOT = r"""
import json, re, socket, sys, time

LENGTH = re.compile(rb"\r\ncontent-length: *([0-9]+)", re.I)
connections = {}


class Connection:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def call(self, template, nonce):
        body = template % nonce
        self.sock.sendall(b"POST /OKX HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            buffer += self.receive()
            end = buffer.find(b"\r\n\r\n")
        total = end + 4 + int(LENGTH.search(buffer, 0, end).group(1))
        while len(buffer) < total:
            buffer += self.receive()
        self.buffer = buffer[total:]
        return buffer[end + 4:total]

    def receive(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk


def connection(port):
    if port not in connections:
        connections[port] = Connection(port)
    return connections[port]


def loop(job):
    conn, templates, nonce = connection(job["port"]), [body.encode() for body in job["bodies"]], job["nonce"]
    ok, errors, samples = 0, 0, []
    while time.monotonic() < job["start"]:
        time.sleep(max(0.0, min(0.01, job["start"] - time.monotonic())))
    began = now = time.monotonic()
    end = job["start"] + job["seconds"]
    while now < end:
        for template in templates:
            nonce += 1
            answer = conn.call(template, nonce)
            if answer.startswith(b'{"data"'):
                ok += 1
            else:
                errors += 1
                if len(samples) < 3:
                    samples.append(answer[:300].decode("utf-8", "replace"))
        now = time.monotonic()
    return {"ok": ok, "errors": errors, "samples": samples, "seconds": now - began}


def poll(job):
    conn, template, nonce = connection(job["port"]), job["body"].encode(), job["nonce"]
    conn.call(template, nonce)
    print(json.dumps({"ready": True}), flush=True)
    polls = errors = 0
    deadline = time.monotonic() + job["timeout"]
    while time.monotonic() < deadline:
        nonce += 1
        answer = json.loads(conn.call(template, nonce))
        polls += 1
        data = answer.get("data")
        if not isinstance(data, dict):
            errors += 1
        elif data.get(job["field"]) != job["before"]:
            return {"seen": time.monotonic(), "polls": polls, "errors": errors, "value": data.get(job["field"])}
    return {"seen": None, "polls": polls, "errors": errors, "value": None}


for line in sys.stdin:
    job = json.loads(line)
    try:
        result = {"loop": loop, "poll": poll}[job["op"]](job)
    except Exception as exc:
        result = {"failed": repr(exc)}
    print(json.dumps(result), flush=True)
"""


def _robot_body(method, params, access_key=KEY, secret_key=SECRET_FIELD):
    """A docker request body for _ROBOT: the envelope's JSON with "%d" where the nonce goes."""
    fields = (json.dumps(value).replace("%", "%%") for value in (access_key, secret_key, method, params))
    return '{"access_key":%s,"secret_key":%s,"nonce":%%d,"method":%s,"params":%s}' % tuple(fields)


class _RobotProcesses:
    """`count` robot processes (the _ROBOT script), used for the ceiling and for the plugin alike."""

    def __init__(self, count):
        self.processes = []
        self._nonce = time.time_ns()
        try:
            for _ in range(count):
                self.processes.append(subprocess.Popen([sys.executable, "-c", _ROBOT], stdin=subprocess.PIPE,
                                                       stdout=subprocess.PIPE, universal_newlines=True))
        except Exception:
            self.close()
            raise

    def send(self, process, job):
        self._nonce += 10 ** 9
        process.stdin.write(json.dumps(dict(job, nonce=self._nonce)) + "\n")
        process.stdin.flush()

    def answer(self, process):
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("a robot process exited (%s)" % process.poll())
        answer = json.loads(line)
        if "failed" in answer:
            raise RuntimeError("a robot failed: %s" % answer["failed"])
        return answer

    def rate(self, port, bodies, seconds):
        """Every robot sends `bodies` round and round for `seconds` from one start: calls per second of
        all together, and the answers that were no {"data": ...}."""
        start = time.monotonic() + 0.15          # every robot has read its job and connected by then
        for process in self.processes:
            self.send(process, {"op": "loop", "port": port, "bodies": bodies, "start": start, "seconds": seconds})
        results = [self.answer(process) for process in self.processes]
        return {"calls_per_s": sum(r["ok"] / r["seconds"] for r in results),
                "calls": sum(r["ok"] + r["errors"] for r in results), "errors": sum(r["errors"] for r in results),
                "samples": [sample for r in results for sample in r["samples"]][:3]}

    def close(self):
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _cpu_s(pid):
    """CPU seconds (user and system, every thread) that process `pid` used so far; None off Linux."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _busy_s():
    """CPU seconds that all CPUs spent running processes so far, and stolen by the hypervisor (/proc/stat:
    user, nice, system, steal; not irq and softirq, where the kernel moves the benchmark's own loopback
    packets without charging them to a process); None off Linux."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _, _, _, _, steal = (int(field) for field in stat.readline().split()[1:9])
        return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _against_ceiling(robots, port, bare_port, bodies, fake, seconds, pids, rounds=3):
    """The robots on the bare server (the ceiling) and on the plugin in turn, `rounds` times for
    `seconds` / `rounds` each, so that the shared machine's changing speed hits both alike. With OKX's
    REST requests and 50011 answers meanwhile, and the share of the machine's CPU that processes other
    than the benchmark's (`pids`, the robots and this one) took: others' test suites, or the hypervisor."""
    ours_pids = [process.pid for process in robots.processes] + list(pids) + [os.getpid()]
    cpu_before, busy_before, started = [_cpu_s(pid) for pid in ours_pids], _busy_s(), time.monotonic()
    requests, limited = len(fake.requests), fake.rate_limited
    ceilings, ours = [], []
    for _ in range(rounds):
        ceilings.append(robots.rate(bare_port, bodies, seconds / rounds))
        ours.append(robots.rate(port, bodies, seconds / rounds))
    cpu_after, busy_after, wall = [_cpu_s(pid) for pid in ours_pids], _busy_s(), time.monotonic() - started
    ceiling_rate = sum(each["calls_per_s"] for each in ceilings) / rounds
    rate, calls = sum(each["calls_per_s"] for each in ours) / rounds, sum(each["calls"] for each in ours)
    result = {"robots": len(robots.processes), "robots_calls_per_s": round(rate, 1),
              "robots_errors": sum(each["errors"] for each in ours), "ceiling_calls_per_s": round(ceiling_rate, 1),
              "of_ceiling": "%d%%" % round(100 * rate / ceiling_rate),
              "of_ceiling_by_round": ["%d%%" % round(100 * mine["calls_per_s"] / bare["calls_per_s"])
                                      for mine, bare in zip(ours, ceilings)],
              "rest_requests_per_call": round((len(fake.requests) - requests) / max(1, calls), 4),
              "okx_50011_while_robots_ran": fake.rate_limited - limited}
    if None not in cpu_before + cpu_after + [busy_before, busy_after]:
        outside = (busy_after - busy_before) - sum(cpu_after) + sum(cpu_before)
        result["outside_cpu"] = "%d%%" % max(0, round(100 * outside / (wall * (os.cpu_count() or 1))))
    samples = [sample for each in ours for sample in each["samples"]][:3]
    if samples:
        result["error_samples"] = samples
    return result


def _until_from_memory(fake, calls, timeout=30):
    """Repeat `calls` ([(docker, method, params)]) until one round costs OKX no REST request; returns the
    seconds that took (None: REST still asked after `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = len(fake.requests)
        for docker, method, params in calls:
            docker.call(method, params)
        if len(fake.requests) == before:
            return round(time.monotonic() - started, 2)
        time.sleep(0.2)
    return None


def _bench_keys(fake, count):
    """`count` live keys with an account at `fake`: KEY, then new ones; [(access key, Secret Key field)]."""
    keys = [(KEY, SECRET_FIELD)]
    with fake._lock:
        for n in range(1, count):
            key, secret, passphrase = "be7c4000-0000-4000-8000-%012d" % n, "%032X" % (n * 0xB3C4), "Bench-Pass-%d" % n
            fake.accounts[key] = new_account(secret, passphrase, False, str(77000000000000000 + n), LIVE_BALANCES)
            keys.append((key, "%s,%s" % (secret, passphrase)))
    return keys


def _add_spot_instruments(fake, inst_ids):
    """More spot instruments at the fake's REST API (the stream's _Market prices them: bid 100, ask 100.01)."""
    with fake._lock:
        for inst_id in inst_ids:
            base, quote = inst_id.split("-")
            fake._instruments[inst_id] = make_instrument("SPOT", inst_id, "0.01", "0.000001", "0.001", "5",
                                                         base=base, quote=quote)
            fake._market[inst_id] = {"bid": Decimal("100"), "ask": Decimal("100.01"), "last": Decimal("100"),
                                     "base": Decimal("100"), "seq": 1000}


def _order_lookups(fake):
    return sum(1 for r in fake.requests if r["method"] == "GET" and r["path"] == "/api/v5/trade/order")


def _fill_latency(robots, port, docker, fake, samples):
    """Resting orders placed through the plugin, then: how long until `order` answers every one from
    memory (the plugin reads its own orders from REST until their push came), and, one order at a time,
    milliseconds from the fake's fill (its push) to the first `order` answer showing it, polled back to
    back by one robot process."""
    if samples < 1:
        return {}
    order_ids = [docker.call("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "30000",
                                       "amount": "0.001"})["data"]["id"] for _ in range(samples)]
    placed, waiting, rounds = time.monotonic(), list(order_ids), 0
    while waiting and time.monotonic() - placed < 10:      # the plugin paces the lookups to OKX's 60 per 2 s
        if rounds:
            time.sleep(0.5)
        rounds += 1
        for order_id in list(waiting):
            before = _order_lookups(fake)
            answer = docker.call("order", {"id": order_id, "symbol": "BTC_USDT"})
            if answer.get("data", {}).get("deal_amount") == "0" and _order_lookups(fake) == before:
                waiting.remove(order_id)
        if rounds == 1:
            at_once = samples - len(waiting)
    result = {"own_orders": samples, "own_orders_from_memory_at_once": at_once,
              "own_orders_all_from_memory_s": None if waiting else round(time.monotonic() - placed, 2)}
    if waiting:
        raise RuntimeError("orders %s never came from the account stream" % waiting)
    robot, latencies, lookups, polls = robots.processes[0], [], _order_lookups(fake), 0
    for order_id in order_ids:
        body = _robot_body("order", {"id": order_id, "symbol": "BTC_USDT"})
        robots.send(robot, {"op": "poll", "port": port, "body": body, "field": "deal_amount", "before": "0",
                            "timeout": 5})
        robots.answer(robot)                                    # {"ready": true}: polling
        time.sleep(random.uniform(0.001, 0.003))
        pushed = time.monotonic()
        fake.fill(order_id.partition(",")[2])
        seen = robots.answer(robot)
        if seen["seen"] is None:
            raise RuntimeError("the fill of %s never reached an order answer" % order_id)
        latencies.append((seen["seen"] - pushed) * 1000)
        polls += seen["polls"]
    result.update(fills=samples, fill_to_order_p50_ms=round(_bench_percentile(latencies, 0.5), 2),
                  fill_to_order_p90_ms=round(_bench_percentile(latencies, 0.9), 2),
                  fill_to_order_max_ms=round(max(latencies), 2), polls_per_fill=round(polls / samples, 1),
                  order_rest_lookups_while_polling=_order_lookups(fake) - lookups)
    return result


def bench_streams(options):
    """The live streams, in one plugin process against a fake OKX that enforces OKX's rate limits and
    serves both WebSockets (TLS): ticker and depth from the market stream with 50 instruments warmed up,
    then accounts, positions and orders of one key from its account stream with 10 keys on account
    streams. Robot processes measure each beside the ceiling of this design, a bare ThreadingHTTPServer
    answering a fixed JSON body, in the same run. Yields the market line, then the account line."""
    public, private = {"name": "ours, live stream"}, {"name": "ours, private stream"}
    cert_folder = tempfile.mkdtemp(prefix="fmz-bench-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, cert_folder, True)
        cert, key = write_test_cert(cert_folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        fake = stack.enter_context(FakeOKX(tls=True, latency_ms=options.rtt_ms, handshake_ms=2 * options.rtt_ms))
        fake.enforce_rate_limits = True
        keys = _bench_keys(fake, 10)
        okx_stream = stack.enter_context(FakeOKXStream(ssl_context=context, okx=fake))
        extra = ["X%02d-USDT" % n for n in range(46)]
        okx_stream.instruments.update(extra)
        _add_spot_instruments(fake, extra)
        processes = []

        def stop_processes():
            for process in processes:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        stack.callback(stop_processes)
        bare_port, port = free_port(), free_port()
        bare = _start_process([sys.executable, "-c", _BARE_SERVER, str(bare_port)], bare_port)[0]
        processes.append(bare)
        argv = [sys.executable, os.path.join(HERE, "fmz_custom_protocol.py"), "--address", "127.0.0.1", "--port",
                str(port), "--api-base", fake.base_url, "--ws-base", okx_stream.url]
        plugin_process = _start_process(argv, port, dict(os.environ, SSL_CERT_FILE=fake.cert_path))[0]
        processes.append(plugin_process)
        robots = _RobotProcesses(options.robots)
        stack.callback(robots.close)

        docker = Docker(port)
        stack.callback(docker.close)
        try:        # the market stream: every call of every instrument from memory first
            symbols = ["ETH_USDT", "BTC_USDT", "LTC_USDT", "BTC_USDT.swap"] + [i.replace("-", "_") for i in extra]
            public["warm_up_s"] = _until_from_memory(fake, [
                (docker, method, dict(params, symbol=symbol)) for symbol in symbols
                for method, params in (("ticker", {}), ("depth", {"limit": 20}), ("trades", {}))])
            public["rss_50_instruments_kb"] = _rss_kb(plugin_process.pid)
            latencies, _ = _timed_calls(docker, "ticker", {"symbol": "ETH_USDT"}, options.calls * 5)
            public["ticker_p50_ms"] = round(_bench_percentile(latencies, 0.5), 3)
            latencies, _ = _timed_calls(docker, "depth", {"symbol": "ETH_USDT", "limit": 20}, options.calls * 5)
            public["depth_p50_ms"] = round(_bench_percentile(latencies, 0.5), 3)
            public.update(_against_ceiling(robots, port, bare_port, [_robot_body("ticker", {"symbol": "ETH_USDT"})],
                                           fake, options.seconds, (bare.pid, plugin_process.pid)))
            public["okx_50011"] = fake.rate_limited
        except Exception as exc:    # report the failure in the line rather than hide the other one
            public["failed"] = repr(exc)
        yield public

        try:        # the account streams: a resting order and a position on KEY, then 10 keys warmed up
            limited = fake.rate_limited
            docker.call("trade", {"symbol": "BTC_USDT", "type": "buy", "price": "30000", "amount": "0.001"})
            docker.call("trade", {"symbol": "BTC_USDT.swap", "type": "buy", "price": "-1", "amount": "1"})
            reads = (("accounts", {}), ("positions", {"symbol": "BTC_USDT.swap"}), ("orders", {"symbol": "BTC_USDT"}))
            dockers = [docker] + [stack.enter_context(contextlib.closing(Docker(port, access_key=access_key,
                                                                                  secret_key=secret_key)))
                                  for access_key, secret_key in keys[1:]]
            private["keys"] = len(keys)
            private["warm_up_s"] = _until_from_memory(fake, [(each, method, params) for each in dockers
                                                             for method, params in reads])
            private["rss_10_keys_50_instruments_kb"] = _rss_kb(plugin_process.pid)
            private.update(_against_ceiling(robots, port, bare_port, [_robot_body(*read) for read in reads],
                                            fake, options.seconds, (bare.pid, plugin_process.pid)))
            private.update(_fill_latency(robots, port, docker, fake, options.fills))
            private["rss_end_kb"] = _rss_kb(plugin_process.pid)
            private["okx_50011"] = fake.rate_limited - limited
        except Exception as exc:
            private["failed"] = repr(exc)
        yield private


def bench(argv):
    """Benchmark the plugin (and other plugin commands) against the fake OKX over TLS with a simulated
    round trip; prints one JSON line per plugin, after the `direct` floor, then the live-stream lines."""
    import argparse
    parser = argparse.ArgumentParser(prog="python3 test_protocol.py bench")
    parser.add_argument("--rtt-ms", type=float, default=20, help="simulated network round trip")
    parser.add_argument("--robots", type=int, default=8, help="robots calling at once")
    parser.add_argument("--calls", type=int, default=40, help="calls per measurement")
    parser.add_argument("--seconds", type=float, default=6,
                        help="seconds the robot processes loop on each server per stream line (3 rounds in turn)")
    parser.add_argument("--fills", type=int, default=20, help="fills timed from the fake's push to `order`")
    parser.add_argument("--no-stream", action="store_true", help="skip the live-stream measurements")
    parser.add_argument("plugins", nargs="*", metavar="NAME=COMMAND",
                        help="more plugin commands, with {port}, {api_base} and {python} placeholders")
    options = parser.parse_args(argv)
    ours = "ours={python} %s --address 127.0.0.1 --port {port} --api-base {api_base}" % os.path.join(
        HERE, "fmz_custom_protocol.py")
    print(json.dumps({"name": "machine", "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
                      "python": sys.version.split()[0]}), flush=True)
    with FakeOKX(tls=True, latency_ms=options.rtt_ms, handshake_ms=2 * options.rtt_ms) as fake:
        print(json.dumps(bench_direct(fake, options)), flush=True)
        for spec in [ours] + options.plugins:
            name, command = spec.split("=", 1)
            print(json.dumps(bench_plugin(name, command, fake, options)), flush=True)
    if not options.no_stream:
        for result in bench_streams(options):
            print(json.dumps(result), flush=True)


# ---- Durations: python3 test_protocol.py durations [--top N] [TEST ...] ----

def durations(argv):
    """Run the suite (or the named tests, e.g. LostOrderTest) and print the slowest tests and classes:
    a test that waits for real time shows up here first."""
    top = 15
    if argv[:1] == ["--top"]:
        top, argv = int(argv[1]), argv[2:]
    times = []

    class TimedResult(unittest.TextTestResult):
        def startTest(self, test):
            self._started = time.monotonic()
            super().startTest(test)

        def stopTest(self, test):
            super().stopTest(test)
            times.append((time.monotonic() - self._started, test.id().split(".", 1)[1]))
    loader = unittest.defaultTestLoader
    suite = loader.loadTestsFromNames(argv, sys.modules[__name__]) if argv else loader.loadTestsFromModule(
        sys.modules[__name__])
    started = time.monotonic()
    result = unittest.TextTestRunner(resultclass=TimedResult, verbosity=0).run(suite)
    classes = collections.Counter()
    for seconds, name in times:
        classes[name.split(".")[0]] += seconds
    print("slowest tests:")
    for seconds, name in sorted(times, reverse=True)[:top]:
        print("%8.3f s  %s" % (seconds, name))
    print("slowest classes:")
    for name, seconds in classes.most_common(top):
        print("%8.3f s  %s" % (seconds, name))
    print("%d tests in %.1f s" % (len(times), time.monotonic() - started))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench(sys.argv[2:])
    elif sys.argv[1:2] == ["durations"]:
        sys.exit(durations(sys.argv[2:]))
    else:
        unittest.main()
