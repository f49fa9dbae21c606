#!/usr/bin/env python3
"""FMZ Quant custom-protocol plugin for OKX: one file, standard library only.

The FMZ docker (the program that runs your robots) speaks to a "Custom Protocol" exchange over HTTP.
For every exchange call a strategy makes (``exchange.GetTicker()``, ``exchange.Buy()``, ...), the docker
sends ``POST /OKX`` to this plugin with a JSON body::

    {"access_key": "...", "secret_key": "SECRET,PASSPHRASE[,simulate]", "nonce": 1730275031047002000,
     "method": "ticker", "params": {"symbol": "ETH_USDT"}}

The plugin calls OKX's v5 REST API (signing private calls), and answers ``{"data": ..., "raw": ...}``
(``data`` in the shape the docker expects, ``raw`` OKX's own answer) or ``{"error": "text"}``. What robots
poll (ticker, depth, trades; balances, positions, orders) is answered from OKX's WebSocket streams kept in
memory while they are provably live, and from REST otherwise. ``GET /status`` shows the operator how it is
doing.

Run it on the docker's machine::

    python3 fmz_custom_protocol.py                # listens on 127.0.0.1:6666
    python3 fmz_custom_protocol.py --help         # every flag

and add an exchange in FMZ: protocol "Custom Protocol", service address ``http://127.0.0.1:6666/OKX``,
Access Key = your OKX API key, Secret Key = ``SECRET,PASSPHRASE`` (append ``,simulate`` for OKX demo
trading). README.md documents every method, flag and error.

How the file reads, top to bottom (each part under a banner, each readable or skippable as a whole):

1. constants and the error family (every failure is a ``ProtocolError``, answered in one place);
2. small pure helpers: symbols, decimals, periods, order states, conditions, signing, bounded memories;
3. time: the injectable clock everything measures with, and OKX's time kept on it;
4. transport: how bytes reach OKX, knowing nothing of FMZ (pooled keep-alive HTTPS connections, the proxy
   tunnel, OKX's rate limits, the signed-request client and what it does with OKX's codes);
5. order safety: every order placed at most once, and never lost track of (``OrderPlacer``);
6. the WebSocket client both live streams share, and the thread that keeps a connection open;
7. the live market stream (OKX's public WebSocket: ticker, depth and trades from memory);
8. the live account stream (OKX's private WebSocket, one per API key: balances, positions, orders);
9. ``BaseProtocol``: the docker-facing contract, one method per docker method, each documenting its ``data``;
10. ``OKX``: the mapping of each docker method onto OKX, in the order of the protocol;
11. ``DISPATCH``: docker method names (and their accepted spellings) to handlers and parameters;
12. the HTTP server that the docker talks to, with ``GET /status``;
13. the command line and ``main()``.

To add another exchange, subclass ``BaseProtocol`` like ``OKX`` does and register it in ``EXCHANGES``
under the last path segment of the service address.
"""

import argparse
import base64
import bisect
import collections
import datetime
import errno
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from decimal import Decimal
from typing import Any, Dict, List, Optional, Tuple

__version__ = "1.0.0"

__all__ = [
    "Config", "Clock", "ProtocolError", "BadRequest", "NotSupported", "ExchangeError", "TransportError",
    "RateLimited", "OrderNotPlaced", "OrderOutcomeUnknown", "OrderPlacer", "LiveConnection", "MarketStream",
    "AccountStream", "Symbol", "Condition", "parse_condition",
    "BaseProtocol", "OKX", "DISPATCH", "EXCHANGES", "PluginServer", "main",
]

log = logging.getLogger("fmz_okx")


# =====================================================================================================
# Constants, settings and errors
# =====================================================================================================

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 6666
DEFAULT_API_BASE = "https://www.okx.com"
DEFAULT_TIMEOUT = 10.0            # seconds one docker call may take, OKX round trips included
DEFAULT_STREAM_IDLE = 300.0       # seconds before an instrument nobody asks about is unsubscribed

MAX_REQUEST_BYTES = 1 << 20       # a docker request body larger than this is refused unread
MAX_JSON_DIGITS = 64              # a JSON integer with more digits is refused (int() of a long one is slow)
MAX_KEY_CHARS = 64                # an access key longer than this is refused (OKX's are 36 characters)
CLIENT_READ_TIMEOUT = 20.0        # a docker connection silent this long (mid-request or idle) is closed
STOP_DRAIN_SECONDS = 0.8          # at a stop, calls being served may finish this long (within a second)
MAX_DOCKER_CONNECTIONS = 256      # connections served at once; more are closed at once (bounded threads)
POOL_IDLE_REUSE = 30.0            # a kept-alive OKX connection idle longer than this is not reused
POOL_MAX_IDLE = 32                # idle OKX connections kept per origin
INSTRUMENTS_TTL = 300.0           # seconds an instrument list is reused
ACCOUNT_CONFIG_TTL = 300.0        # seconds an account's position mode / account level is reused
CLOCK_RESYNC_INTERVAL = 1800.0    # seconds between background re-syncs with OKX's clock
MEMORY_ENTRIES = 10000            # entries kept per kind of memory (keys, orders, leverage): least recent go

OKX_MAX_DEPTH = 400               # /market/books sz maximum
OKX_MAX_TRADES = 500              # /market/trades limit maximum
OKX_CANDLES_PAGE = 300            # /market/candles limit maximum
OKX_HISTORY_CANDLES_PAGE = 100    # /market/history-candles: OKX's sites document a maximum of 100 or 300
OKX_ORDERS_PAGE = 100             # orders-pending / orders-history limit maximum
OKX_MAX_INST_ID = 64              # longer than any OKX instId: a longer one is refused before any use
MAX_RECORDS = 5000                # bars one `records` call may ask for (past ~2300, OKX's limit makes it wait)
DEFAULT_RECORDS = 300
DEFAULT_DEPTH = 20
DEFAULT_HISTORY_ORDERS = 100
HISTORY_DAYS = 7                  # /trade/orders-history reaches this far back; the archive beyond

# FMZ period in minutes -> OKX candle bar (UTC-aligned from 6 hours up, as FMZ's own bars are).
PERIOD_TO_BAR = {
    1: "1m", 3: "3m", 5: "5m", 15: "15m", 30: "30m", 60: "1H", 120: "2H", 240: "4H",
    360: "6Hutc", 720: "12Hutc", 1440: "1Dutc", 10080: "1Wutc",
}

# OKX order state -> FMZ order status. Canceled orders that had fills become "partial-canceled".
ORDER_STATUS = {
    "live": "pending",
    "partially_filled": "partial-filled",
    "filled": "filled",
    "canceled": "canceled",
    "mmp_canceled": "canceled",
}

# Delivery futures are named by FMZ contract type; OKX lists the same name as the instrument's alias.
FUTURES_ALIASES = ("this_week", "next_week", "quarter", "next_quarter",
                   "this_month", "next_month", "third_quarter")     # the last three: OKX's, not FMZ's

# OKX's WebSocket base for each REST host: (live keys, demo keys). Another --api-base (a test server,
# say) has no stream unless --ws-base names one.
STREAM_BASES = {
    host: ("wss://ws.okx.com:8443", "wss://wspap.okx.com:8443")
    for host in ("www.okx.com", "okx.com", "aws.okx.com", "openapi.okx.com")
}
STREAM_BASES["eea.okx.com"] = ("wss://wseea.okx.com:8443", "wss://wseeapap.okx.com:8443")
STREAM_BASES["us.okx.com"] = ("wss://wsus.okx.com:443", "wss://wsuspap.okx.com:443")

# OKX's request limits, from each endpoint's page of OKX's v5 docs: (method, path) -> (requests, seconds,
# scope). Scope says who shares the bucket, as OKX counts: "ip" (everybody on this host), "key" (one API
# key), and "+instId" / "+instType" narrow it to one instrument / instrument type.
RATE_LIMITS = {
    ("GET", "/api/v5/market/ticker"): (20, 2, "ip"),
    ("GET", "/api/v5/market/tickers"): (20, 2, "ip"),
    ("GET", "/api/v5/market/books"): (40, 2, "ip"),
    ("GET", "/api/v5/market/trades"): (100, 2, "ip"),
    ("GET", "/api/v5/market/candles"): (40, 2, "ip"),
    ("GET", "/api/v5/market/history-candles"): (20, 2, "ip"),
    ("GET", "/api/v5/public/instruments"): (20, 2, "ip+instType"),
    ("GET", "/api/v5/public/time"): (10, 2, "ip"),
    ("GET", "/api/v5/public/funding-rate"): (10, 2, "ip+instId"),
    ("GET", "/api/v5/account/balance"): (10, 2, "key"),
    ("GET", "/api/v5/asset/balances"): (6, 1, "key"),
    ("POST", "/api/v5/trade/order"): (60, 2, "key+instId"),
    ("POST", "/api/v5/trade/cancel-order"): (60, 2, "key+instId"),
    ("GET", "/api/v5/trade/order"): (60, 2, "key+instId"),
    ("GET", "/api/v5/trade/orders-pending"): (60, 2, "key"),
    ("GET", "/api/v5/trade/orders-history"): (40, 2, "key"),
    ("GET", "/api/v5/trade/orders-history-archive"): (20, 2, "key"),
    ("GET", "/api/v5/account/positions"): (10, 2, "key"),
    ("POST", "/api/v5/account/set-leverage"): (20, 2, "key"),
    ("GET", "/api/v5/account/config"): (5, 2, "key"),
    ("GET", "/api/v5/account/leverage-info"): (20, 2, "key"),
    ("POST", "/api/v5/trade/amend-order"): (60, 2, "key+instId"),
    ("POST", "/api/v5/trade/order-algo"): (20, 2, "key+instId"),
    ("POST", "/api/v5/trade/amend-algos"): (20, 2, "key+instId"),
    ("POST", "/api/v5/trade/cancel-algos"): (20, 2, "key"),
    ("GET", "/api/v5/trade/order-algo"): (20, 2, "key"),
    ("GET", "/api/v5/trade/orders-algo-pending"): (20, 2, "key"),
    ("GET", "/api/v5/trade/orders-algo-history"): (20, 2, "key"),
}
# OKX counts a request when it arrives; this margin keeps our window a little wider than OKX's so
# that network jitter never puts one request too many into OKX's window.
RATE_WINDOW_MARGIN = 0.15

# What an OKX error code asks of the plugin (OKX's v5 docs, "Error Code"). The request loop of OKXClient
# acts on the first two; order safety on the third.
RESYNC = "re-sync the clock and send again"            # refused for its time, before anything was done
RETRY = "wait for the window and send again once"      # refused by the rate limit, before anything was done
RECOVER = "find the order by its client id"            # an order's outcome is open: it may exist
CODE_ACTIONS = {
    "50102": RESYNC,      # the signature's timestamp is more than 30 s from OKX's clock
    "50036": RESYNC,      # expTime is earlier than OKX's time
    "50011": RETRY,       # rate limit
    "50004": RECOVER,     # endpoint request timeout: "does not mean that the request was successful or failed"
    "51149": RECOVER,     # order timed out
    "50013": RECOVER,     # systems busy
    "50026": RECOVER,     # system error
    "50001": RECOVER,     # service temporarily unavailable
    "51016": RECOVER,     # clOrdId already exists: the order is there
    "51065": RECOVER,     # algoClOrdId already exists: the algo order is there
}

# What an OKX error code most likely means for a user of this plugin, and what to do about it. The only
# place hints are written; ``{path}`` and ``{limit}`` are filled in with the endpoint and its rate limit.
ERROR_HINTS = {
    "50101": "the key does not match the environment: a demo-trading key needs ',simulate' at the end of "
             "the Secret Key field in FMZ, a live key must not have it",
    "50119": "this key does not exist on this OKX site: a key made on the EEA site needs "
             "--api-base https://eea.okx.com, one made on OKX US needs --api-base https://us.okx.com",
    "50111": "OKX does not know this API key: check the Access Key, and the OKX site it was made on "
             "(--api-base https://eea.okx.com for EEA keys, https://us.okx.com for US keys)",
    "50113": "the signature was refused: the secret in the Secret Key field (before the first comma) is wrong",
    "50105": "the passphrase was refused: the Secret Key field must be SECRET,PASSPHRASE with the "
             "passphrase chosen when the key was made",
    "50102": "this machine's clock is too far from OKX's: the plugin re-synchronised with OKX's clock; "
             "if this persists, enable NTP (timedatectl set-ntp true)",
    "50110": "this key is bound to IP addresses and this machine's address is not among them",
    "50011": "OKX's rate limit was reached for {path}{limit}; the plugin waits for its turn before calling "
             "OKX again",
    "50004": "OKX timed out on the request: its outcome is unknown, check before repeating it",
    "51603": "no such order: the id is wrong, or the order was canceled without fills, which OKX forgets "
             "about 2 hours after the cancel",
    # the private stream's login refusals, OKX's WebSocket twins of the REST codes above
    "60005": "OKX does not know this API key: check the Access Key, and the OKX site it was made on",
    "60007": "the login's signature was refused: the secret in the Secret Key field (before the first comma) "
             "is wrong",
    "60024": "the passphrase was refused: the Secret Key field must be SECRET,PASSPHRASE with the passphrase "
             "chosen when the key was made",
    "60032": "this key does not exist on this OKX site: a key made on the EEA site needs "
             "--api-base https://eea.okx.com, one made on OKX US needs --api-base https://us.okx.com",
}


# The docker method the current thread serves: ``method`` as the docker spelled it (for log lines),
# ``counted`` the name it is counted under (for GET /status). "-" outside a call.
_context = threading.local()


class Config:
    """The plugin's settings: the command line's flags, and the clock everything measures time with."""

    def __init__(self, api_base=DEFAULT_API_BASE, timeout=DEFAULT_TIMEOUT, margin_mode="cross", proxy=None,
                 ca_file=None, ws_base=None, stream=True, stream_idle=DEFAULT_STREAM_IDLE, clock=None,
                 private_stream=True):
        self.api_base, self.timeout, self.margin_mode = api_base, timeout, margin_mode
        self.proxy, self.ca_file = proxy, ca_file
        self.ws_base, self.stream, self.stream_idle = ws_base, stream, stream_idle
        self.private_stream = stream and private_stream
        self.clock = clock or Clock()


class ProtocolError(Exception):
    """Base of every failure the docker is told about; str(error) becomes the ``{"error": ...}`` text."""


class BadRequest(ProtocolError):
    """The docker's request is malformed: missing or mistyped fields, unknown method, bad symbol."""


class NotSupported(ProtocolError):
    """The method exists in the protocol but this exchange wrapper cannot do it."""


class TransportError(ProtocolError):
    """OKX could not be reached or did not answer usefully (connect, timeout, reset, proxy, non-JSON).

    ``maybe_sent`` is True when the request may have reached OKX and been acted upon: for an order, its
    outcome is then unknown and must be found out, never guessed.
    """

    def __init__(self, message, maybe_sent=False):
        super().__init__(message)
        self.maybe_sent = maybe_sent


class RateLimited(ProtocolError):
    """A call would exceed OKX's rate limit for longer than the call may wait; OKX was not called."""


class ExchangeError(ProtocolError):
    """OKX answered with an error code: ``code`` and ``message`` are OKX's own (per-order sCode/sMsg first).

    ``outcome_unknown`` is True when the code (or an HTTP 5xx) leaves open whether OKX acted on the request.
    """

    def __init__(self, code, message, http_status=200, path=""):
        self.code, self.message, self.http_status, self.path = str(code), message, http_status, path
        text = "OKX %s: %s" % (self.code, message or "(no message)")
        if http_status not in (200, None):
            text += " (HTTP %d)" % http_status
        hint = ERROR_HINTS.get(self.code)
        if hint:
            limit = RATE_LIMITS.get(("GET", path)) or RATE_LIMITS.get(("POST", path))
            text += " (hint: %s)" % hint.format(path=path or "this endpoint",
                                                limit=" (%d requests per %d s)" % limit[:2] if limit else "")
        super().__init__(text)

    @property
    def outcome_unknown(self):
        return CODE_ACTIONS.get(self.code) == RECOVER or (self.http_status or 200) >= 500


# =====================================================================================================
# Pure helpers: symbols, decimals, periods, conditions, order states, signing, bounded memories
# =====================================================================================================

MAX_NUMBER_DIGITS = 40          # digits before (or zeros after) the point that a number may have
MAX_NUMBER_CHARS = 64
_DECIMAL_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_PRINTABLE_RE = re.compile(r"^[\x20-\x7e]*$")      # what HTTP header values can carry
_CURRENCY_RE = re.compile(r"^[A-Za-z0-9]{1,20}$")     # OKX currency names: BTC, USDT, 1INCH
_CONTRACT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")  # swap, this_week, 250328, BTC-USD-261225-100000-C
_OPTION_RE = re.compile(r"^[A-Za-z0-9]+-[A-Za-z0-9]+-[0-9]{6}-[0-9.]+-[CPcp]$")  # family-YYMMDD-strike-C|P


def decimal_text(value: Any, name: str, allow_negative_one: bool = False) -> str:
    """Return ``value`` (string or JSON number) as plain decimal text for OKX, never via float.

    ``"0.00001"`` stays ``"0.00001"``, ``1E-5`` becomes ``"0.00001"``, ``"100.50"`` stays ``"100.50"``.
    Raises BadRequest unless the value is a positive finite decimal (or ``-1`` when allowed: market price).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal, float)):
        raise BadRequest("%s must be a decimal number, got %s" % (name, _describe(value)))
    if isinstance(value, float):  # only when a caller bypassed the Decimal-preserving JSON parser
        value = repr(value)
    text = str(value).strip()
    if len(text) > MAX_NUMBER_CHARS or not _DECIMAL_RE.match(text):
        raise BadRequest("%s must be a decimal number, got %s" % (name, _describe(value)))
    number = Decimal(text)
    if not -MAX_NUMBER_DIGITS <= number.adjusted() <= MAX_NUMBER_DIGITS:   # 1e999999999 is no amount
        raise BadRequest("%s is out of range: %s" % (name, _describe(value)))
    if allow_negative_one and number == -1:
        return "-1"
    if number <= 0:
        raise BadRequest("%s must be greater than 0, got %s" % (name, text))
    if "e" in text.lower():
        text = format(number, "f")
    text = text.lstrip("+")
    if text.endswith("."):                 # "2900." -> "2900"
        text = text[:-1]
    if text.startswith("."):               # ".01" -> "0.01"
        text = "0" + text
    return text


def _describe(value):
    """A short, safe description of a bad parameter value for error texts."""
    if isinstance(value, str):
        text = repr(value[:41])
    else:
        text = json.dumps(value, default=str)[:41]
    return text if len(text) <= 40 else text[:37] + "..."


def parse_int(value: Any, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """Return ``value`` (int, integral Decimal, or digit string) as int, within the bounds if given."""
    if isinstance(value, bool):
        raise BadRequest("%s must be a whole number, got %s" % (name, _describe(value)))
    if isinstance(value, Decimal) and value.is_finite() and value.adjusted() > MAX_NUMBER_DIGITS:
        raise BadRequest("%s is out of range: %s" % (name, _describe(value)))   # int() of 1E+300000 is slow
    if isinstance(value, str) and len(value.strip()) > MAX_NUMBER_DIGITS + 1:
        raise BadRequest("%s is out of range: %s" % (name, _describe(value)))
    if isinstance(value, int):
        number = value
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        number = int(value)
    elif isinstance(value, str) and re.match(r"^\s*[+-]?[0-9]+\s*$", value):
        number = int(value)
    else:
        raise BadRequest("%s must be a whole number, got %s" % (name, _describe(value)))
    if minimum is not None and number < minimum:
        raise BadRequest("%s must be at least %d, got %d" % (name, minimum, number))
    if maximum is not None and number > maximum:
        raise BadRequest("%s must be at most %d, got %d" % (name, maximum, number))
    return number


def split_symbol(fmz_symbol: Any, contract_type: Optional[str] = None) -> Tuple[str, str, str]:
    """Split an FMZ symbol into ``(base, quote, contract)``.

    ``"eth_usdt"`` -> ``("ETH", "USDT", "")``; ``"BTC_USDT.swap"`` -> ``("BTC", "USDT", "swap")``.
    A contract type given apart from the symbol (``contract_type`` param) counts when the symbol has none.
    """
    if not isinstance(fmz_symbol, str) or not fmz_symbol.strip():
        raise BadRequest("symbol must be a string like ETH_USDT, got %s" % _describe(fmz_symbol))
    if len(fmz_symbol.strip()) > OKX_MAX_INST_ID:
        raise BadRequest("symbol %s is longer than any OKX instrument" % _describe(fmz_symbol))
    pair, _, contract = fmz_symbol.strip().partition(".")
    base, sep, quote = pair.partition("_")
    if not sep or not _CURRENCY_RE.match(base) or not _CURRENCY_RE.match(quote):
        raise BadRequest("symbol %s is not an FMZ pair like ETH_USDT (BASE_QUOTE)" % _describe(fmz_symbol))
    if not contract and contract_type:
        if not isinstance(contract_type, str) or len(contract_type) > OKX_MAX_INST_ID:
            raise BadRequest("contract_type must be a string like swap, got %s" % _describe(contract_type))
        contract = contract_type.strip()
    if contract and not _CONTRACT_RE.match(contract):
        raise BadRequest("unknown contract type %s: use swap, %s, or a delivery date YYMMDD"
                         % (_describe(contract), ", ".join(FUTURES_ALIASES)))
    contract = contract.upper() if _OPTION_RE.match(contract) else contract.lower()   # options keep OKX's instId
    if contract == "spot":
        contract = ""
    return base.upper(), quote.upper(), contract


def fmz_symbol_of(inst_id: str, alias: str = "") -> str:
    """The FMZ symbol of an OKX instId: ``BTC-USDT`` -> ``BTC_USDT``, ``BTC-USDT-SWAP`` -> ``BTC_USDT.swap``,
    ``BTC-USD-250328`` -> ``BTC_USD.quarter`` when its alias is known, else ``BTC_USD.250328``; an option
    keeps its whole instId: ``BTC-USD-261225-100000-C`` -> ``BTC_USD.BTC-USD-261225-100000-C``."""
    parts = inst_id.split("-")
    symbol = "_".join(parts[:2])
    if len(parts) < 3:
        return symbol
    if _OPTION_RE.match(inst_id):
        return "%s.%s" % (symbol, inst_id)
    return "%s.%s" % (symbol, "swap" if parts[2] == "SWAP" else (alias or parts[2]))


def inst_type_of(inst_id: str) -> str:
    """``SPOT``, ``SWAP``, ``FUTURES`` or ``OPTION`` from the form of an instId."""
    parts = inst_id.split("-")
    if len(parts) < 3:
        return "SPOT"
    if _OPTION_RE.match(inst_id):
        return "OPTION"
    return "SWAP" if parts[2] == "SWAP" else "FUTURES"


def okx_bar(period: Any) -> str:
    """The OKX candle bar for an FMZ period in minutes (``60`` -> ``"1H"``); BadRequest for others."""
    minutes = parse_int(period, "period")
    try:
        return PERIOD_TO_BAR[minutes]
    except KeyError:
        raise BadRequest("period %d is not supported; use one of %s (minutes)"
                         % (minutes, ", ".join(str(p) for p in PERIOD_TO_BAR))) from None


# FMZ's condition types (CreateConditionOrder's ConditionType) and the OKX algo ordType each one becomes.
CONDITION_TYPES = {0: "oco", 1: "conditional", 2: "conditional", 3: "trigger"}
CONDITION_NAMES = {0: "OCO", 1: "take-profit", 2: "stop-loss", 3: "generic"}
CONDITION_FIELDS = ("ConditionType", "TpTriggerPrice", "TpOrderPrice", "SlTriggerPrice", "SlOrderPrice")


class Condition(collections.namedtuple("Condition", "type tp_trigger tp_order sl_trigger sl_order")):
    """A parsed FMZ condition: ``type`` 0 OCO, 1 take-profit, 2 stop-loss, 3 generic; each price decimal
    text, ``"-1"`` for a market order price, or None when not set."""

    @property
    def legs(self):
        """The legs that are set: ``{"tp": (trigger, order), "sl": (trigger, order)}``."""
        legs = {}
        for leg, trigger, order in (("tp", self.tp_trigger, self.tp_order), ("sl", self.sl_trigger, self.sl_order)):
            if trigger is not None or order is not None:
                legs[leg] = (trigger, order)
        return legs


def parse_condition(value: Any, name: str = "condition", partial: bool = False) -> "Condition":
    """FMZ's condition object (or its JSON text), its field names in any letter case, as a Condition.

    A price of 0 or absent is not set (FMZ's typed languages send 0 for unset fields); an order price of
    -1 is a market order. Each leg that is set needs its trigger and its order price.
    """
    if isinstance(value, str):
        try:
            value = loads_exact(value)
        except (ValueError, RecursionError):
            raise BadRequest("%s must be an object or its JSON text, got %s" % (name, _describe(value))) from None
    if not isinstance(value, dict):
        raise BadRequest("%s must be an object like {\"ConditionType\": 0, ...}, got %s" % (name, _describe(value)))
    fields = {str(key).lower(): field_value for key, field_value in value.items()}
    kind = fields.get("conditiontype")
    if kind is None or kind == "":
        raise BadRequest("%s.ConditionType is required: 0 OCO, 1 take-profit, 2 stop-loss, 3 generic" % name)
    kind = parse_int(kind, name + ".ConditionType", 0, 3)
    prices = []
    for field in CONDITION_FIELDS[1:]:
        raw = fields.get(field.lower())
        if raw is None or raw == "" or (not isinstance(raw, bool) and isinstance(raw, (int, Decimal, str))
                                        and _is_zero(raw)):
            prices.append(None)
        else:
            prices.append(decimal_text(raw, "%s.%s" % (name, field), allow_negative_one=field.endswith("OrderPrice")))
    condition = Condition(kind, *prices)
    for leg, (trigger, order) in condition.legs.items():
        if trigger is None or order is None:
            raise BadRequest("%s: the %s leg needs both %sTriggerPrice and %sOrderPrice (-1: market)"
                             % (name, "take-profit" if leg == "tp" else "stop-loss", leg.title(), leg.title()))
    wanted = {0: ("tp", "sl"), 1: ("tp",), 2: ("sl",)}.get(kind)
    legs = sorted(condition.legs)
    if partial:                           # an amendment sets only what changes
        if kind == 3 and len(legs) > 1:
            raise BadRequest("%s: a generic condition has one leg, got two" % name)
        return condition
    if wanted is not None and tuple(legs) != tuple(sorted(wanted)):
        raise BadRequest("%s: a%s %s condition needs %s" % (
            name, "n" if kind == 0 else "", CONDITION_NAMES[kind],
            {0: "both a take-profit and a stop-loss leg", 1: "the take-profit leg only",
             2: "the stop-loss leg only"}[kind]))
    if kind == 3 and len(legs) != 1:
        raise BadRequest("%s: a generic condition needs one leg (TpTriggerPrice/TpOrderPrice or "
                         "SlTriggerPrice/SlOrderPrice), got %d" % (name, len(legs)))
    return condition


# Condition orders (OKX's algo orders): their kinds, FMZ statuses, and the client id of each.
ALGO_ORD_TYPES = ("conditional,oco", "trigger")           # what orders-algo-pending/-history are asked for
ALGO_FINAL_STATES = ("effective", "canceled", "order_failed")
ALGO_STATUS = {"live": "pending", "pause": "pending", "partially_effective": "pending", "effective": "filled",
               "canceled": "canceled", "order_failed": "canceled", "partially_failed": "canceled"}
ALGO_SL_PREFIX = "fmzs"           # the algoClOrdId of a generic condition set on its stop-loss leg


def algo_legs(condition: "Condition") -> Dict[str, str]:
    """The OKX fields of a condition's legs: ``tpTriggerPx``/``tpOrdPx`` and ``slTriggerPx``/``slOrdPx``,
    or, for a generic condition, ``triggerPx``/``orderPx`` of its one leg. Legs not set are left out."""
    if condition.type == 3:
        (trigger, order), = condition.legs.values()
        return {"triggerPx": trigger, "orderPx": order}
    fields = {}
    for leg, (trigger, order) in sorted(condition.legs.items()):
        fields[leg + "TriggerPx"], fields[leg + "OrdPx"] = trigger, order
    return fields


def algo_client_id_for(nonce: Any, condition: "Condition") -> str:
    """The algoClOrdId of a condition order: like ``clord_id_for``, so that a request places at most one;
    ``fmzs`` marks a generic condition set on its stop-loss leg (OKX keeps only triggerPx for it)."""
    digits = clord_id_for(nonce)[3:]
    if condition.type == 3 and "sl" in condition.legs:
        return ALGO_SL_PREFIX + digits[-28:]
    return "fmz" + digits


def _is_zero(value):
    try:
        return Decimal(str(value).strip() or "0") == 0
    except ArithmeticError:
        return False


def loads_exact(text: str) -> Any:
    """JSON text as Python, numbers with a point as Decimal (never float). ValueError (RecursionError when
    nested deeper than Python follows) also for NaN or Infinity, and for an integer of more than
    MAX_JSON_DIGITS digits: Python 3.8 to 3.10 take seconds to read one of a million digits."""
    return json.loads(text, parse_float=Decimal, parse_int=_json_int, parse_constant=_no_constants)


def _json_int(text):
    if len(text) > MAX_JSON_DIGITS:
        raise ValueError("an integer of %d digits" % len(text))
    return int(text)


def _no_constants(name):
    raise ValueError("%s is not a number" % name)


def _loggable(text):
    """Docker input as it may appear in a log line: printable and short, or its short description."""
    return text if len(text) <= 64 and _PRINTABLE_RE.match(text) else _describe(text)


def parse_docker_json(body: bytes) -> Any:
    """A docker request body as JSON (``loads_exact``); BadRequest when it is not UTF-8 or not JSON."""
    try:
        return loads_exact(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("request body is not JSON (nested too deeply)") from None
    except ValueError as exc:
        raise BadRequest("request body is not JSON (%s)" % exc) from None


def fmz_order_status(state: str, filled: Optional[str]) -> str:
    """FMZ order status for OKX ``state``; ``filled`` is accFillSz (decides partial-canceled)."""
    status = ORDER_STATUS.get(state, state or "unknown")
    if status == "canceled" and filled not in ("", None) and Decimal(filled) > 0:
        return "partial-canceled"
    return status


def okx_timestamp(epoch_ms: float) -> str:
    """OKX's OK-ACCESS-TIMESTAMP form: UTC ISO 8601 with exactly three millisecond digits and ``Z``."""
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000.0, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (int(epoch_ms) % 1000)


def sign_request(secret: str, timestamp: str, method: str, request_path: str, body: str = "") -> str:
    """OK-ACCESS-SIGN: Base64(HMAC-SHA256(secret, timestamp + METHOD + path-with-query + body))."""
    prehash = timestamp + method.upper() + request_path + body
    digest = hmac.new(secret.encode("utf-8"), prehash.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def clord_id_for(nonce: Any) -> str:
    """The clOrdId of the order a docker request places: ``fmz`` + the request's nonce digits.

    The same request (same nonce) always yields the same clOrdId, so it can never open a second order and
    a lost answer can be recovered by asking OKX for this clOrdId. OKX allows 32 alphanumerics.
    """
    digits = str(parse_int(nonce, "nonce", minimum=0))
    return "fmz" + digits[-29:]


def parse_secret_field(secret_field: Any) -> Tuple[str, str, bool]:
    """Split FMZ's Secret Key field ``SECRET,PASSPHRASE[,simulate]`` into ``(secret, passphrase, demo)``."""
    if not isinstance(secret_field, str):
        raise BadRequest("secret_key must be a string 'SECRET,PASSPHRASE'")
    if len(secret_field) > 4 * MAX_KEY_CHARS:
        raise BadRequest("secret_key is longer than an OKX secret and passphrase (%d characters at most)"
                         % (4 * MAX_KEY_CHARS))
    parts = [part.strip() for part in secret_field.split(",")]
    while len(parts) > 2 and not parts[-1]:
        parts.pop()                        # a comma pasted at the end is no part of the passphrase
    demo = len(parts) > 2 and parts[-1].lower() == "simulate"
    if demo:
        parts = parts[:-1]
        while len(parts) > 2 and not parts[-1]:
            parts.pop()
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise BadRequest("secret_key must be 'SECRET,PASSPHRASE' (OKX keys have a passphrase; "
                         "append ',simulate' for demo trading)")
    if not all(_PRINTABLE_RE.match(part) for part in parts):
        raise BadRequest("secret_key may hold only printable ASCII characters (a line break pasted along?)")
    return parts[0], ",".join(parts[1:]), demo


class Credentials:
    """One OKX API key as the docker sent it. Its repr never shows the secret or the passphrase."""

    __slots__ = ("api_key", "secret", "passphrase", "demo")

    def __init__(self, api_key, secret, passphrase, demo=False):
        self.api_key, self.secret, self.passphrase, self.demo = api_key, secret, passphrase, demo

    def __repr__(self):
        return "Credentials(api_key=%s..., demo=%s)" % (self.api_key[:4], self.demo)

    def headers(self, timestamp, method, request_path, body):
        """The OK-ACCESS-* headers of one signed request."""
        return {
            "OK-ACCESS-KEY": self.api_key,
            "OK-ACCESS-SIGN": sign_request(self.secret, timestamp, method, request_path, body),
            "OK-ACCESS-TIMESTAMP": timestamp,
            "OK-ACCESS-PASSPHRASE": self.passphrase,
        }


def json_default(value):
    """JSON encoding of the Decimals that the Decimal-preserving parser produced: exact decimal text."""
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError("%s is not JSON serialisable" % type(value).__name__)


def dumps(value: Any) -> str:
    """Compact JSON, Decimals as exact text."""
    return json.dumps(value, separators=(",", ":"), default=json_default, ensure_ascii=False)


class EncodedJSON(str):
    """JSON text encoded once and kept: an answer's ``raw`` that memory serves to many robots unchanged
    goes into their answers as it is (encoding OKX's long rows was a fifth of such a call's cost)."""


def encode_answer(answer: Dict[str, Any]) -> bytes:
    """The docker's answer as JSON bytes (``raw`` may be EncodedJSON)."""
    raw = answer.get("raw")
    if isinstance(raw, EncodedJSON):
        head = json.dumps({"data": answer["data"]}, separators=(",", ":"), default=json_default)
        return (head[:-1] + ',"raw":' + raw + "}").encode("utf-8")
    return json.dumps(answer, separators=(",", ":"), default=json_default).encode("utf-8")


def _ms(value):
    """OKX's millisecond string as an int (0 when empty)."""
    return int(value) if value not in ("", None) else 0


def _zero_if_empty(value):
    return value if value not in ("", None) else "0"


def _precision(step):
    """Decimal places of a step such as "0.001" (3) or "1" (0)."""
    exponent = Decimal(step).normalize().as_tuple().exponent if step not in ("", None) else 0
    return max(0, -exponent)


class LastUsed:
    """A mapping that keeps at most ``size`` entries: storing one more forgets the least recently used.

    Every memory the plugin keeps per key, order or contract is one of these, so that weeks of robots,
    keys and symbols coming and going cannot make it grow without bound. Thread-safe.
    """

    def __init__(self, size=MEMORY_ENTRIES):
        self.size = size
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key]

    def __setitem__(self, key, value):
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def pop(self, key, default=None):
        with self._lock:
            return self._entries.pop(key, default)

    def __contains__(self, key):
        return key in self._entries

    def __len__(self):
        return len(self._entries)

    def values(self):
        with self._lock:
            return list(self._entries.values())


# =====================================================================================================
# Time: the clock everything measures with, and OKX's time kept on it
# =====================================================================================================

class Clock:
    """The plugin's one source of time (``Config.clock``).

    ``time()`` is this machine's wall clock, which NTP, a VM resume or an operator may step at any moment;
    ``monotonic()`` only moves forward, steadily, and is what every duration, deadline and timer uses;
    ``sleep(seconds)`` and ``wait(event, timeout)`` are how the plugin waits. Tests give the plugin an
    object with the same four methods that runs on virtual time, so that they move time instead of waiting
    for it. (Durations in log lines are measured in real time, whatever the clock.)
    """

    def time(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        if seconds > 0:
            time.sleep(seconds)

    def wait(self, event, timeout):
        """Wait until ``event`` (a threading.Event) is set, True, or ``timeout`` seconds passed, False."""
        return event.wait(timeout)


class ExchangeClock:
    """OKX's time, kept on the monotonic clock: what signatures and expTime are stamped with.

    OKX refuses a signature whose timestamp is more than 30 s from its own time (50102), and executes an
    order only before its expTime. Each sync with /api/v5/public/time keeps OKX's time and the monotonic
    moment it was read at (the middle of the round trip); OKX's time at any later moment is that plus the
    monotonic time elapsed since. A step of this machine's wall clock after a sync therefore changes
    nothing, and the re-sync every CLOCK_RESYNC_INTERVAL covers the slow drift between the two clocks.
    Before the first sync, and while OKX's clock cannot be read, OKX's time is taken to be the wall clock.
    """

    def __init__(self, clock):
        self.clock = clock
        self.synced_at = None     # monotonic time of the last successful sync
        self._anchor = None       # (OKX's time in ms, the monotonic time it was read at)
        self._lock = threading.Lock()
        self._refreshing = False

    def now_ms(self):
        """OKX's time now, in milliseconds since the epoch."""
        anchor = self._anchor
        if anchor is None:
            return self.clock.time() * 1000.0
        return anchor[0] + (self.clock.monotonic() - anchor[1]) * 1000.0

    def needs_sync(self):
        return self.synced_at is None

    @property
    def anchored(self):
        """True once OKX's time was read at least once."""
        return self._anchor is not None

    def is_stale(self):
        return self.synced_at is not None and self.clock.monotonic() - self.synced_at > CLOCK_RESYNC_INTERVAL

    def update(self, server_ms, sent_at, received_at):
        """Record OKX's time ``server_ms``, read between the monotonic moments ``sent_at`` and ``received_at``."""
        middle = (sent_at + received_at) / 2.0
        wall_ms = (self.clock.time() - (self.clock.monotonic() - middle)) * 1000.0
        with self._lock:
            self._anchor = (server_ms, middle)
            self.synced_at = received_at
        offset_ms = server_ms - wall_ms
        if abs(offset_ms) > 1000:
            log.warning("this machine's clock is %.1f s %s OKX's; signing with OKX's time",
                        abs(offset_ms) / 1000, "behind" if offset_ms > 0 else "ahead of")

    def retry_in(self, seconds):
        """A sync failed: go on with what is known (the last sync, or the wall clock), and try again after
        ``seconds`` rather than at every signed call."""
        self.synced_at = self.clock.monotonic() - CLOCK_RESYNC_INTERVAL + seconds

    def start_refresh(self):
        """True for the one caller that should refresh a stale sync (the others go on with the old one)."""
        with self._lock:
            if self._refreshing:
                return False
            self._refreshing = True
            return True

    def end_refresh(self):
        with self._lock:
            self._refreshing = False


# =====================================================================================================
# Transport: pooled keep-alive connections, proxy tunnel, rate limits, the signed client
# =====================================================================================================

def tls_context(ca_file: Optional[str] = None) -> ssl.SSLContext:
    """The one TLS context for OKX: certificates and host names verified against the system's CAs
    (``SSL_CERT_FILE`` honoured), plus those of ``ca_file`` (e.g. a TLS-inspecting proxy's) when given."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def service_url(url: str, schemes: Tuple[str, str], name: str) -> Tuple[str, str, Optional[int]]:
    """``(scheme, host, port)`` of a URL given as a flag, or ValueError saying what is wrong with it.

    The plain scheme of ``schemes`` (``http``, ``ws``) is allowed only to loopback addresses: to any other
    host it would carry API keys, passphrases and signatures in clear.
    """
    secure, plain = schemes
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError("%s is not a URL (%s)" % (name, exc)) from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError("%s must be a %s:// URL with a host, like %s://%s"
                         % (name, secure, secure, "www.okx.com" if secure == "https" else "ws.okx.com:8443"))
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ValueError("%s must be %s://host[:port] alone, without a path, query or user" % (name, secure))
    if port == 0:
        raise ValueError("%s has port 0: give the port OKX (or your test server) listens on" % name)
    if parts.scheme.lower() == plain and not is_loopback(parts.hostname):
        raise ValueError("%s %s://%s would send your API key, passphrase and signatures in clear; use %s://"
                         % (name, plain, parts.netloc, secure))
    return parts.scheme.lower(), parts.hostname, port


class Proxy:
    """An HTTP proxy that HTTPS to OKX tunnels through with CONNECT (``http://[user:password@]host:port``).

    The password may hold any character (``#``, ``?``, ``/``, ``@``, ``:``), as it is or percent-encoded.
    ``str(proxy)`` names the proxy without the password, and no error about a proxy URL shows any part of
    what was given: it may be a password.
    """

    def __init__(self, url):
        refusal = ValueError("the proxy must look like http://[user:password@]host:port (the value given is "
                             "not shown: it may hold a password)")
        text = url.strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            rest = text
        elif scheme.lower() != "http":
            raise ValueError("only http:// proxies are supported (no https:// or SOCKS proxy)")
        userinfo, at, hostport = rest.rpartition("@")
        hostport = hostport[:-1] if hostport.endswith("/") else hostport
        match = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?$", hostport)
        if match is None or (match.group(2) and not 0 < int(match.group(2)) < 65536):
            raise refusal
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2) or 8080)
        self.headers = {}
        user = None
        if at:
            user, _, password = userinfo.partition(":")
            user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
            if not _PRINTABLE_RE.match(user) or not user:
                raise refusal
            token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")
            self.headers["Proxy-Authorization"] = "Basic " + token
        host = "[%s]" % self.host if ":" in self.host else self.host
        self.label = "http://%s%s:%d" % (user + "@" if user else "", host, self.port)

    def __str__(self):
        return self.label

    @classmethod
    def from_environment(cls, target_url):
        """The proxy the usual ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` variables give for a URL, or None."""
        if not any(name.lower().endswith("_proxy") for name in os.environ):
            return None
        import urllib.request     # only when proxy variables are set: it costs memory and start-up time
        parts = urllib.parse.urlsplit(target_url)
        proxies = urllib.request.getproxies_environment()
        url = proxies.get(parts.scheme)
        if not url or urllib.request.proxy_bypass_environment(parts.hostname, proxies):
            return None
        try:
            return cls(url)
        except ValueError as exc:
            raise ValueError("%s_proxy: %s" % (parts.scheme, exc)) from None


class HeaderFields(dict):
    """HTTP header fields by lower-cased name (the last of repeated ones); ``get`` ignores case."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


MAX_HEADER_LINE = 65536           # as http.server and http.client: a longer header line is refused
MAX_HEADERS = 100


def read_header_fields(rfile: Any) -> "HeaderFields":
    """The header block of an HTTP message, read line by line up to the blank line: HeaderFields, or
    ValueError for a line too long, too many lines, or a line that is not ``name: value``. (The email
    package that http.server and http.client use for this costs more than the rest of a call.)"""
    fields, name = HeaderFields(), None
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise ValueError("Line too long")
        if line in (b"\r\n", b"\n", b""):
            return fields
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and name is not None:        # a folded continuation line
            fields[name] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise ValueError("Bad header line")
        fields[name] = value.strip()
    raise ValueError("Too many headers")


class _Response(http.client.HTTPResponse):
    """http.client's response, its header block read by ``read_header_fields`` (OKX's answers are small:
    parsing their headers with the email package was a tenth of a call's cost)."""

    def begin(self):
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            self._fields()                # the header block of a 100 Continue
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = self._fields()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        length = self.headers.get("content-length")
        self.length = int(length) if length and length.strip().isdigit() and not self.chunked else None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 \
                or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def _fields(self):
        try:
            return read_header_fields(self.fp)
        except ValueError as exc:
            raise http.client.HTTPException("OKX's answer has a malformed header block (%s)" % exc) from None

    def getheader(self, name, default=None):
        return self.headers.get(name, default)


class ConnectionPool:
    """Kept-alive HTTP/1.1 connections to one origin (OKX's API host), shared by every robot.

    A call takes an idle connection (or opens one: TCP, TLS, and the proxy tunnel if any), sends one
    request, reads the whole answer and gives the connection back. Robots never wait for each other: each
    concurrent call has its own connection. One TLS context serves every connection.
    """

    def __init__(self, base_url, clock, ssl_context=None, proxy=None):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL: %r" % base_url)
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.clock = clock
        self.ssl_context = ssl_context
        self.proxy = proxy
        self._idle = []           # [(connection, last used monotonic time)], most recent last
        self._lock = threading.Lock()
        self.opened = 0           # connections opened so far (for tests and the benchmark)

    def _open(self, timeout):
        if self.proxy:
            connection = self._new_connection(self.proxy.host, self.proxy.port, timeout)
            connection.set_tunnel(self.host, self.port, headers=self.proxy.headers)
        else:
            connection = self._new_connection(self.host, self.port, timeout)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise TransportError("TLS certificate of %s could not be verified (%s); set --ca-file or "
                                 "SSL_CERT_FILE if a proxy re-signs TLS" % (self.host, exc.verify_message))
        except OSError as exc:
            connection.close()
            raise TransportError(self._connect_error_text(exc)) from None
        with self._lock:
            self.opened += 1
        return connection

    def _new_connection(self, host, port, timeout):
        if self.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self.ssl_context)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.response_class = _Response
        return connection

    def _connect_error_text(self, exc):
        if self.proxy:
            text = str(exc)
            if text.startswith("Tunnel connection failed"):
                return "proxy %s refused the tunnel to %s:%d: %s" % (self.proxy, self.host, self.port,
                                                                      text.split(":", 1)[1].strip())
            return "cannot reach proxy %s: %s" % (self.proxy, _os_error_text(exc))
        return "cannot connect to %s:%d: %s" % (self.host, self.port, _os_error_text(exc))

    def remaining(self, deadline):
        """Seconds left until ``deadline``; TransportError when none are (checked before sending: not sent)."""
        left = deadline - self.clock.monotonic()
        if left <= 0.001:
            raise TransportError("the call's time ran out before OKX could be asked")
        return left

    def _take(self, timeout):
        """An idle connection fresh enough to reuse, or a new one; and whether it was reused."""
        now = self.clock.monotonic()
        with self._lock:
            while self._idle:
                connection, last_used = self._idle.pop()
                if (now - last_used <= POOL_IDLE_REUSE and connection.sock is not None
                        and not _closed_by_peer(connection.sock)):
                    return connection, True
                connection.close()
        return self._open(timeout), False

    def _give_back(self, connection):
        with self._lock:
            if len(self._idle) < POOL_MAX_IDLE:
                self._idle.append((connection, self.clock.monotonic()))
                return
        connection.close()

    def request(self, method, target, body, headers, deadline, retry_stale=True):
        """Send one request; return ``(status, body bytes)``.

        ``deadline`` (monotonic) bounds connecting, sending and reading. A reused connection that the server
        had already closed is retried once on a new connection when ``retry_stale`` (safe calls); otherwise
        TransportError says whether the request may have reached OKX (``maybe_sent``).
        """
        while True:
            connection, reused = self._take(self.remaining(deadline))
            try:
                connection.sock.settimeout(self.remaining(deadline))
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError) as exc:
                connection.close()
                if reused and retry_stale:
                    retry_stale = False
                    continue
                raise TransportError("connection to %s was closed before OKX answered (%s)"
                                     % (self.host, _os_error_text(exc)), maybe_sent=True) from None
            except socket.timeout:
                connection.close()
                raise TransportError("OKX did not answer within the timeout", maybe_sent=True) from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise TransportError("connection to %s failed: %s" % (self.host, _os_error_text(exc)),
                                     maybe_sent=True) from None
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._give_back(connection)
            return response.status, payload

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()


def _closed_by_peer(sock):
    """True when an idle kept-alive socket is readable: the server closed it (or sent what it should not)."""
    try:
        if hasattr(select, "poll"):       # no limit on descriptor numbers, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _os_error_text(exc):
    """A short text for a network error (OSError or http.client's own exceptions)."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class RateLimiter:
    """OKX's request limits, kept on our side so that robots sharing a key never see 50011.

    Each bucket is a sliding window of the times its requests were sent. A call whose bucket is full waits
    for its turn when that comes before the call's deadline, else fails at once with RateLimited (without
    calling OKX). When OKX still answers 50011, the bucket is treated as full for a whole window.
    Endpoints not in RATE_LIMITS are not limited; buckets of different endpoints never wait for each other.
    A bucket whose window has emptied is dropped, so keys and instruments that come and go leave nothing.
    """

    SWEEP_EVERY = 1024            # new buckets between two sweeps of emptied ones

    def __init__(self, clock, limits=None):
        self.clock = clock
        self.limits = RATE_LIMITS if limits is None else limits
        self._windows = {}        # bucket -> deque of send times (monotonic)
        self._lock = threading.Lock()
        self._created = 0

    def bucket(self, method, path, api_key, params):
        """The bucket key of a request, or None for an endpoint without a known limit."""
        rule = self.limits.get((method, path))
        if rule is None:
            return None
        scope = rule[2]
        key = [method, path]
        if scope.startswith("key"):
            key.append(api_key or "")
        for field in ("instId", "instType"):
            if "+" + field in scope:
                value = str(params.get(field, "")) if isinstance(params, dict) else ""
                key.append(value if len(value) <= OKX_MAX_INST_ID else "(too long)")  # OKX refuses those
        return tuple(key)

    def in_use(self):
        """The number of buckets that hold requests now."""
        with self._lock:
            return len(self._windows)

    def usage(self):
        """``{endpoint: buckets in use}`` (a bucket per key or instrument, by the endpoint's scope), the
        buckets whose window holds a request now. Keys are not shown."""
        now = self.clock.monotonic()
        usage = collections.Counter()
        with self._lock:
            for bucket, sent in self._windows.items():
                window = self.limits[(bucket[0], bucket[1])][1] + RATE_WINDOW_MARGIN
                if sent and sent[-1] > now - window:
                    usage["%s %s" % bucket[:2]] += 1
        return dict(usage)

    def acquire(self, bucket, deadline):
        """Wait for a place in ``bucket``'s window, or raise RateLimited if it would come after deadline."""
        if bucket is None:
            return
        count, seconds, _ = self.limits[(bucket[0], bucket[1])]
        window = seconds + RATE_WINDOW_MARGIN
        while True:
            with self._lock:
                now = self.clock.monotonic()
                sent = self._windows.get(bucket)
                if sent is None:
                    sent = self._windows[bucket] = collections.deque()
                    self._created += 1
                    if self._created % self.SWEEP_EVERY == 0:
                        self._sweep(now)
                while sent and sent[0] <= now - window:
                    sent.popleft()
                if len(sent) < count:
                    sent.append(now)
                    return
                wait = sent[0] + window - now
            if now + wait > deadline:
                raise RateLimited("OKX allows %d requests per %d s on %s and they are used up for the next "
                                  "%.1f s, longer than the call may wait; OKX was not called"
                                  % (count, seconds, bucket[1], wait))
            self.clock.sleep(wait)

    def _sweep(self, now):
        """Drop the buckets whose every request has left the window (under the lock)."""
        for bucket, sent in list(self._windows.items()):
            window = self.limits[(bucket[0], bucket[1])][1] + RATE_WINDOW_MARGIN
            if not sent or sent[-1] <= now - window:
                del self._windows[bucket]

    def backoff(self, bucket):
        """OKX answered 50011 anyway: treat the bucket as full for one whole window from now."""
        if bucket is None:
            return
        count, _, _ = self.limits[(bucket[0], bucket[1])]
        with self._lock:
            self._windows[bucket] = collections.deque([self.clock.monotonic()] * count)


class _Flight:
    """One answer on its way (a market-data request, a cache load), awaited by everyone who asked the same."""

    def __init__(self, clock):
        self.clock = clock
        self.done = threading.Event()
        self.value, self.error = None, None

    def result(self, deadline):
        if not self.clock.wait(self.done, max(0.0, deadline - self.clock.monotonic())):
            raise TransportError("no answer from OKX within the timeout")
        if self.error is not None:
            raise self.error
        return self.value


class OKXClient:
    """OKX's REST API as OKX defines it: signing, envelope, error codes, limits, clock; shared by all robots.

    ``request()`` sends one call and returns OKX's JSON envelope ``{"code", "msg", "data"}`` whatever its
    code; ``call()`` returns ``data`` and raises ExchangeError for an error code. Also keeps what changes
    rarely: instrument lists and account configurations. Knows nothing of FMZ.
    """

    def __init__(self, config):
        self.config = config
        self.clock = config.clock
        self.api_base = config.api_base.rstrip("/")
        context = tls_context(config.ca_file) if self.api_base.startswith("https:") else None
        proxy = Proxy(config.proxy) if config.proxy else Proxy.from_environment(self.api_base)
        self.pool = ConnectionPool(self.api_base, self.clock, context, proxy)
        self.limiter = RateLimiter(self.clock)
        self.exchange_clock = ExchangeClock(self.clock)
        self.user_agent = "fmz-okx-plugin/%s" % __version__
        self.requests_sent = collections.Counter()   # path -> requests sent to OKX (for GET /status)
        self._by_method = collections.Counter()      # docker method -> requests it sent to OKX
        self._count_lock = threading.Lock()
        self._first_sync = threading.Lock()
        self._flights = {}        # key -> _Flight of a shared request or a cache load on its way
        self._flights_lock = threading.Lock()
        self._caches = LastUsed()  # (kind, key) -> (expires at, monotonic; value)

    # --- one request ----------------------------------------------------------------------------------
    def request(self, method, path, params=None, body=None, credentials=None, deadline=None,
                exp_time=None, retry_safe=None, demo=False):
        """Send one OKX call and return ``(HTTP status, parsed JSON envelope)``.

        GET/DELETE ``params`` go into the query string; POST ``body`` (an object, or a list for OKX's batch
        endpoints) becomes the JSON body. ``credentials`` signs the call; ``demo`` (or demo credentials) adds
        OKX's demo-trading header. ``exp_time`` (a monotonic moment) becomes OKX's expTime header, in OKX's
        time: an order stuck in transit is never executed after it. ``retry_safe`` (default: GET only)
        allows one retry on a stale kept-alive connection. OKX's answers that refused the request before
        doing anything (CODE_ACTIONS: RESYNC, RETRY) are acted upon here, once each.
        """
        deadline = deadline or self.clock.monotonic() + self.config.timeout
        method = method.upper()
        query = urllib.parse.urlencode([(k, _query_value(v)) for k, v in (params or {}).items()])
        target = path + ("?" + query if query else "")
        if method != "POST":
            payload = ""
        elif isinstance(body, str):        # JSON text given by exchange.IO: sent (and signed) as it is
            payload = body
        else:
            payload = dumps(body if body is not None else {})
        bucket = self.limiter.bucket(method, path, credentials and credentials.api_key,
                                     body if method == "POST" else params)
        if retry_safe is None:
            retry_safe = method == "GET"
        if credentials is not None:
            self._sync_clock_if_needed(deadline)
        done = set()              # the actions taken already: each at most once
        while True:
            try:
                self.limiter.acquire(bucket, deadline)
            except RateLimited:
                if RETRY not in done:
                    raise
                return status, envelope     # OKX's own 50011: no time is left to wait for the window
            headers = {"User-Agent": self.user_agent}
            if method == "POST":
                headers["Content-Type"] = "application/json"
            if credentials is not None:
                timestamp = okx_timestamp(self.exchange_clock.now_ms())
                headers.update(credentials.headers(timestamp, method, target, payload))
            if demo or (credentials is not None and credentials.demo):
                headers["x-simulated-trading"] = "1"
            if exp_time is not None:
                remaining_ms = max(0.0, exp_time - self.clock.monotonic()) * 1000
                headers["expTime"] = str(int(self.exchange_clock.now_ms() + remaining_ms))
            started = time.monotonic()
            self._count(path)
            status, raw = self.pool.request(method, target, payload.encode("utf-8") if payload else None,
                                            headers, deadline, retry_stale=retry_safe)
            log.debug("OKX %s %s -> HTTP %d in %.1f ms", method, target, status,
                      (time.monotonic() - started) * 1000)
            envelope = self._parse(status, raw, path)
            code = _error_code(envelope)
            action = CODE_ACTIONS.get(code)
            if action is RESYNC and action not in done and (credentials is not None or exp_time is not None):
                log.warning("OKX refused the request's time (%s): re-syncing with OKX's clock", code)
                self.sync_clock(deadline)
            elif action is RETRY:
                self.limiter.backoff(bucket)
                if action in done:
                    return status, envelope
                log.warning("OKX rate limit (50011) on %s: waiting for the window and retrying once", path)
            else:
                return status, envelope
            done.add(action)        # and send again: OKX refused the request before doing anything

    def _count(self, path):
        with self._count_lock:
            if path not in self.requests_sent and len(self.requests_sent) >= 64:
                path = "(other paths)"        # exchange.IO may name any path: the count stays small
            self.requests_sent[path] += 1
            self._by_method[getattr(_context, "counted", None) or "(background)"] += 1

    def requests_by_method(self):
        """``{docker method: requests sent to OKX for it}``; "(background)" for the streams' and clock's own."""
        with self._count_lock:
            return dict(self._by_method)

    def call(self, method, path, params=None, body=None, credentials=None, deadline=None, **options):
        """Send one OKX call; return its ``data`` list, or raise ExchangeError for any error code."""
        status, envelope = self.request(method, path, params, body, credentials, deadline, **options)
        raise_for_code(envelope, status, path)
        data = envelope.get("data")
        return data if isinstance(data, list) else ([] if data is None else [data])

    @staticmethod
    def _parse(status, raw, path):
        try:
            envelope = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            envelope = None
        if not isinstance(envelope, dict) or ("code" not in envelope and "data" not in envelope):
            snippet = raw[:80].decode("utf-8", "replace").strip().replace("\n", " ") or "(empty)"
            raise TransportError("OKX answered HTTP %d with a body that is not OKX's JSON on %s: %s"
                                 % (status, path, snippet), maybe_sent=True)
        return envelope

    def _once(self, key, deadline, produce):
        """``produce()``'s value; callers asking with an equal ``key`` meanwhile wait for it instead."""
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight(self.clock)
        if not leader:
            return flight.result(deadline or self.clock.monotonic() + self.config.timeout)
        try:
            flight.value = produce()
            return flight.value
        except BaseException as exc:       # those waiting on it get the same failure
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.done.set()

    def shared_call(self, path, params, deadline=None, demo=False):
        """``call("GET", ...)`` for public market data, made once for all robots asking it at once.

        A robot whose identical request (same path, query and environment) is already on its way to OKX
        waits for that answer instead of sending another: it costs no round trip and no place in OKX's
        rate limit, and the answer is no older than the one it would have had.
        """
        return self._once(("GET", path, tuple(sorted(params.items())), demo), deadline,
                          lambda: self.call("GET", path, params, deadline=deadline, demo=demo))

    # --- OKX's clock ----------------------------------------------------------------------------------
    def _sync_clock_if_needed(self, deadline):
        if self.exchange_clock.needs_sync():
            with self._first_sync:        # the first signed calls wait for one sync, not one each
                if self.exchange_clock.needs_sync():
                    self.sync_clock(deadline)
        elif self.exchange_clock.is_stale() and self.exchange_clock.start_refresh():
            threading.Thread(target=self._refresh_clock, name="clock-sync", daemon=True).start()

    def _refresh_clock(self):
        try:
            self.sync_clock(self.clock.monotonic() + self.config.timeout)
        finally:
            self.exchange_clock.end_refresh()

    def sync_clock(self, deadline):
        """Read OKX's time once; on failure keep what was known and say so in the log."""
        try:
            sent_at = self.clock.monotonic()
            data = self.call("GET", "/api/v5/public/time", deadline=deadline)
            received_at = self.clock.monotonic()
            self.exchange_clock.update(float(data[0]["ts"]), sent_at, received_at)
        except (ProtocolError, KeyError, IndexError, ValueError, TypeError) as exc:
            if self.exchange_clock.anchored:
                log.warning("could not re-sync with OKX's clock (%s); going on with the last sync", exc)
            else:
                log.warning("could not read OKX's clock (%s); signing with this machine's clock", exc)
            self.exchange_clock.retry_in(60)

    # --- what rarely changes --------------------------------------------------------------------------
    def cached(self, kind, key, ttl, load, deadline=None):
        """``load()``'s value, reused for ``ttl`` seconds; concurrent callers of one key load it once."""
        entry = self._caches.get((kind, key))
        if entry and entry[0] > self.clock.monotonic():
            return entry[1]

        def produce():
            value = load()
            self._caches[(kind, key)] = (self.clock.monotonic() + ttl, value)
            return value
        return self._once(("cache", kind, key), deadline, produce)

    def forget(self, kind, key):
        self._caches.pop((kind, key), None)

    def instruments(self, inst_type, deadline=None, family=None):
        """``{instId: instrument row}`` of one instrument type (SPOT, SWAP, FUTURES, or OPTION of one
        ``family`` such as BTC-USD), cached."""
        params = {"instType": inst_type}
        if family:
            params["instFamily"] = family

        def load():
            rows = self.call("GET", "/api/v5/public/instruments", params, deadline=deadline)
            return {row["instId"]: row for row in rows if isinstance(row, dict) and "instId" in row}
        return self.cached("instruments", (inst_type, family), INSTRUMENTS_TTL, load, deadline)

    def account_config(self, credentials, deadline=None):
        """The key's account configuration (``posMode``, ``acctLv``), cached."""
        def load():
            rows = self.call("GET", "/api/v5/account/config", credentials=credentials, deadline=deadline)
            return rows[0] if rows else {}
        return self.cached("account", (credentials.api_key, credentials.demo), ACCOUNT_CONFIG_TTL, load, deadline)

    def close(self):
        self.pool.close()


def _query_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (list, tuple)):
        return ",".join(_query_value(v) for v in value)
    return str(value)


def _error_code(envelope):
    """OKX's code of an answer; for a failed order ("1") the order's own sCode."""
    code = str(envelope.get("code", ""))
    data = envelope.get("data")
    if code == "1" and isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("sCode"):
        return str(data[0]["sCode"])
    return code


def raise_for_code(envelope: Dict[str, Any], status: int = 200, path: str = "") -> None:
    """Raise ExchangeError unless OKX's envelope says success (code "0", or "2" partial for batches).

    For order calls the reason is in ``data[i].sCode``/``sMsg``: that is what the error names.
    """
    code = str(envelope.get("code", ""))
    if code == "2":
        return
    data = envelope.get("data")
    for row in data if isinstance(data, list) else []:
        if isinstance(row, dict) and str(row.get("sCode", "0")) not in ("0", ""):
            raise ExchangeError(row["sCode"], row.get("sMsg") or envelope.get("msg", ""), status, path)
    if code != "0":
        raise ExchangeError(code, envelope.get("msg", ""), status, path)


# =====================================================================================================
# Order safety: every order placed at most once, and never lost track of
# =====================================================================================================

ORDER_RECOVERY_SECONDS = 2.0      # of a call's time, kept to look for an order whose answer was lost
ORDER_EXPIRY_SECONDS = 5.0        # an order must reach OKX within this (its expTime) or is never executed
ORDER_EXPIRY_MARGIN = 0.25        # after expTime, wait this much more (clock sync accuracy) before "never"
AMEND_PUSH_WAIT = 1.0             # how long modifyorder waits for the push with its amendment's result...
AMEND_READ_BACKS = 3              # ...or, without one, reads the order back this often,
AMEND_READ_BACK_WAIT = 0.2        # this many seconds apart


class OrderKind(collections.namedtuple("OrderKind", "what path id_field client_field lookup_path "
                                                    "lookup_needs_inst_id expires check")):
    """How one kind of order is placed (``path``), named (``id_field``, ``client_field``) and found again
    by its client id (``lookup_path``); ``expires`` when OKX honours the expTime header for it (only then
    can the plugin ever tell that OKX has not got it); ``check`` what a user looks at when it cannot tell."""

    def lookup(self, inst_id, client_id):
        params = {self.client_field: client_id}
        if self.lookup_needs_inst_id:
            params["instId"] = inst_id
        return self.lookup_path, params


PLAIN_ORDER = OrderKind("order", "/api/v5/trade/order", "ordId", "clOrdId", "/api/v5/trade/order", True, True,
                        "open orders")
# OKX has no expTime for algo orders: a lost answer not found again stays unknown.
ALGO_ORDER = OrderKind("condition order", "/api/v5/trade/order-algo", "algoId", "algoClOrdId",
                       "/api/v5/trade/order-algo", False, False, "the condition orders (GetConditionOrders)")
NOT_FOUND_CODES = ("51603",)      # OKX's "Order does not exist" (orders and algo orders alike)


class Placed(collections.namedtuple("Placed", "exchange_id raw")):
    """OKX has the order: ``exchange_id`` is its ordId (or algoId), ``raw`` OKX's answer."""


class Unknown(collections.namedtuple("Unknown", "until reason")):
    """OKX may or may not have the order, and could still execute it until ``until`` (monotonic)."""


class NotPlaced(collections.namedtuple("NotPlaced", "reason")):
    """OKX has no such order and can never execute it: placing it again is safe."""


class OrderNotPlaced(TransportError):
    """The order's answer was lost, and OKX has no such order and can no longer execute one."""


class OrderOutcomeUnknown(TransportError):
    """The order may or may not have been placed, and OKX could not tell within the call's time."""

    def __init__(self, message, outcome):
        super().__init__(message, maybe_sent=True)
        self.outcome = outcome


class OrderPlacer:
    """Places orders for every robot: each at most once, and never loses track of one.

    Every order carries a client id made from the docker's nonce (``clOrdId``, ``algoClOrdId``), and a plain
    order also OKX's expTime: OKX executes it only if it arrives within ORDER_EXPIRY_SECONDS, and never
    after the moment this plugin stops waiting for its answer.

    1. Outcomes are remembered by (API key, environment, kind, client id), the last MEMORY_ENTRIES of them:
       the same nonce again answers the order already placed without calling OKX, and concurrent requests
       with one nonce are served one after the other.
    2. An order is sent once. When its answer is lost (timeout, reset, HTTP 5xx, not OKX's JSON, an OKX code
       that leaves the outcome open: RECOVER in CODE_ACTIONS), it is looked up by its client id. Found: it
       was placed. Not found: it may still be in transit, so the lookup is repeated once its expTime has
       passed (plus ORDER_EXPIRY_MARGIN); still not found, it was not placed and never will be.
    3. When neither can be told within the call's time, the outcome is Unknown, remembered, and answered as
       such. A repeat of the nonce looks the order up again before anything else: it never places a
       second order while the first could still execute.
    """

    def __init__(self, client):
        self.client = client
        self.clock = client.clock
        self._outcomes = LastUsed()      # key -> Placed | Unknown
        self._in_flight = {}             # key -> threading.Event, while one request works on the key
        self._lock = threading.Lock()

    def place(self, kind, credentials, inst_id, body, deadline):
        """Place ``body`` (which carries ``kind.client_field``) once; return Placed. Raises ExchangeError
        when OKX refused it (nothing placed), OrderNotPlaced or OrderOutcomeUnknown."""
        client_id = body[kind.client_field]
        key = (credentials.api_key, credentials.demo, kind.what, client_id)
        known = self._claim(key)
        if isinstance(known, Placed):
            log.info("%s %s,%s (%s %s) was already placed by this request's nonce",
                     kind.what, inst_id, known.exchange_id, kind.client_field, client_id)
            return known
        outcome = None
        try:
            if isinstance(known, Unknown):
                outcome = self._settle(kind, credentials, inst_id, client_id, known.until,
                                       "an earlier request with this nonce got no answer", deadline)
            if outcome is None or isinstance(outcome, NotPlaced):
                outcome = self._send(kind, credentials, inst_id, body, deadline)
        except ExchangeError:
            outcome = None               # OKX refused it: nothing was placed
            raise
        except BaseException:            # whatever failed, the order may be out there
            outcome = Unknown(self.clock.monotonic() + ORDER_EXPIRY_SECONDS, "the plugin failed while placing it")
            raise
        finally:
            self._release(key, outcome)
        if isinstance(outcome, Placed):
            return outcome
        if isinstance(outcome, NotPlaced):
            raise OrderNotPlaced("the %s was not placed: %s; OKX has no %s with %s %s and can no longer "
                                 "execute one (its expTime has passed); it was not sent again"
                                 % (kind.what, outcome.reason, kind.what, kind.client_field, client_id))
        raise OrderOutcomeUnknown("the %s's outcome is unknown: %s: check %s before placing it again"
                                  % (kind.what, outcome.reason, kind.check), outcome)

    def _claim(self, key):
        """The remembered outcome of ``key`` (Placed, Unknown or None), the key then held by this caller
        unless Placed: others asking meanwhile wait for ``_release``."""
        while True:
            with self._lock:
                outcome = self._outcomes.get(key)
                if isinstance(outcome, Placed):
                    return outcome
                event = self._in_flight.get(key)
                if event is None:
                    self._in_flight[key] = threading.Event()
                    return outcome
            event.wait()

    def _release(self, key, outcome):
        with self._lock:
            if isinstance(outcome, Placed):
                self._outcomes[key] = Placed(outcome.exchange_id, None)     # the id is all a repeat needs
            elif isinstance(outcome, Unknown):
                self._outcomes[key] = outcome
            else:                        # refused, or never placed: nothing to remember
                self._outcomes.pop(key)
            event = self._in_flight.pop(key, None)
        if event:
            event.set()

    def window(self, deadline):
        """``(post_deadline, until)`` of an order (or an amendment) sent now in a call due at ``deadline``: it
        waits for OKX's answer until ``post_deadline``, keeping the rest of the call's time to find it again,
        and OKX may execute it until ``until`` (its expTime), ORDER_EXPIRY_SECONDS at most."""
        post_deadline = deadline - min(ORDER_RECOVERY_SECONDS, self.client.config.timeout * 0.4)
        return post_deadline, min(post_deadline, self.clock.monotonic() + ORDER_EXPIRY_SECONDS)

    def _send(self, kind, credentials, inst_id, body, deadline):
        """POST the order once; the outcome (Placed, NotPlaced or Unknown), or ExchangeError (refused)."""
        post_deadline, until = self.window(deadline)
        client_id = body[kind.client_field]
        try:
            status, envelope = self.client.request("POST", kind.path, body=body, credentials=credentials,
                                                   deadline=post_deadline, exp_time=until if kind.expires else None)
            raise_for_code(envelope, status, kind.path)
        except TransportError as exc:
            if not exc.maybe_sent:
                raise                    # it never left: nothing placed
            return self._recover(kind, credentials, inst_id, client_id, str(exc), until, deadline)
        except ExchangeError as exc:
            if not exc.outcome_unknown:
                raise
            return self._recover(kind, credentials, inst_id, client_id, str(exc), until, deadline)
        row = _first_row(envelope.get("data"), kind.id_field)
        if row is None:
            return self._recover(kind, credentials, inst_id, client_id, "OKX's answer named no %s" % kind.id_field,
                                 until, deadline)
        log.info("placed %s: %s %s,%s (%s %s)", _describe_order(body), kind.what, inst_id, row[kind.id_field],
                 kind.client_field, client_id)
        return Placed(str(row[kind.id_field]), envelope)

    def _recover(self, kind, credentials, inst_id, client_id, reason, until, deadline):
        log.warning("placing %s %s gave no clear answer (%s): asking OKX for it", kind.what, client_id, reason)
        outcome = self._settle(kind, credentials, inst_id, client_id, until, reason, deadline)
        if isinstance(outcome, Placed):
            log.info("%s %s was placed: OKX %s %s", kind.what, client_id, kind.id_field, outcome.exchange_id)
        return outcome

    def _settle(self, kind, credentials, inst_id, client_id, until, reason, deadline):
        """What became of an order whose answer was lost: Placed, NotPlaced once OKX has none and its time
        to execute (``until``) has passed, or Unknown when neither can be told before ``deadline``."""
        path, params = kind.lookup(inst_id, client_id)
        while True:
            try:
                row = _first_row(self.client.call("GET", path, params, credentials=credentials, deadline=deadline),
                                 kind.id_field)
                if row is not None:
                    return Placed(str(row[kind.id_field]), {"code": "0", "data": [row], "msg": ""})
            except ExchangeError as exc:
                if exc.code not in NOT_FOUND_CODES:
                    return Unknown(until, "%s; asking OKX for %s %s failed too (%s)"
                                   % (reason, kind.client_field, client_id, exc))
            except ProtocolError as exc:
                return Unknown(until, "%s; asking OKX for %s %s failed too (%s)"
                               % (reason, kind.client_field, client_id, exc))
            now = self.clock.monotonic()
            wait = until + ORDER_EXPIRY_MARGIN - now
            if not kind.expires:          # no expTime: a late arrival can never be ruled out
                return Unknown(until, "%s; OKX has no %s with %s %s, but OKX has no expTime for it: it may "
                                      "still arrive" % (reason, kind.what, kind.client_field, client_id))
            if not self.client.exchange_clock.anchored:
                return Unknown(until, "%s; OKX has no %s with %s %s, but OKX's clock could not be read, so its "
                                      "expTime (stamped with this machine's clock) is uncertain"
                               % (reason, kind.what, kind.client_field, client_id))
            if wait <= 0:
                return NotPlaced(reason)
            if now + wait + 0.05 >= deadline:
                return Unknown(until, "%s; OKX has no %s with %s %s yet, but could still execute one for %.1f s"
                               % (reason, kind.what, kind.client_field, client_id, wait))
            self.clock.sleep(wait)   # an order still in transit executes before its expTime or never


def _first_row(rows, id_field):
    """The first row of OKX's ``data`` that names ``id_field``, or None."""
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and rows[0].get(id_field):
        return rows[0]
    return None


def _describe_order(body):
    """``buy 0.01 ETH-USDT at 2900`` (or ``at market``, or the algo ``ordType``) for log lines."""
    price = body.get("px") or ("market" if body.get("ordType") == "market" else body.get("ordType", ""))
    return "%s %s %s at %s" % (body.get("side"), body.get("sz"), body.get("instId"), price)


# =====================================================================================================
# The WebSocket client both live streams share
# =====================================================================================================

STREAM_FRESH_SECONDS = 3.0        # answer from memory only if the connection was heard from this recently
STREAM_PING_AFTER = 1.0           # silence after which we send the text "ping" (quiet instruments push nothing)
STREAM_DEAD_AFTER = 5.0           # silence, pings unanswered, after which the connection is given up
STREAM_POLL = 0.05                # the stream thread looks at its queue, timers and stop flag this often
STREAM_CONNECT_TIMEOUT = 10.0     # TCP, proxy tunnel, TLS and upgrade together
STREAM_SEND_TIMEOUT = 5.0
STREAM_MAX_MESSAGE = 4 << 20      # a larger message closes the connection (1009)
STREAM_CONNECTS_PER_SECOND = 3    # OKX: "Connection limit: 3 requests per second (based on IP)"
STREAM_BACKOFF_FIRST = 0.5        # wait before the 2nd attempt in a row, doubled for each further one...
STREAM_BACKOFF_MAX = 10.0         # ...up to this
STREAM_STABLE_SECONDS = 10.0      # a connection that lasted this long resets the backoff

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"          # RFC 6455 section 1.3
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class StreamError(Exception):
    """The WebSocket connection failed or must be given up; str() says why. Never leaves the stream's
    thread: robots simply get their answers from REST until the stream is back."""


def websocket_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to our ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode("ascii")


def _masked(payload, mask):
    if not payload:
        return b""
    repeated = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def _writable(sock, timeout):
    """Wait up to ``timeout`` s for ``sock`` to be writable (a connect finished); poll() where there is
    one, as select() fails on descriptors above 1023."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))
    return any(select.select([], [sock], [sock], timeout))


class WebSocketClient:
    """One RFC 6455 client connection carrying text messages, used by one thread.

    ``open()`` connects (through the HTTP CONNECT proxy when one is given, like the REST pool), speaks TLS
    for ``wss://`` verified with the given context, and upgrades, checking ``Sec-WebSocket-Accept``; it gives
    up within STREAM_POLL once ``stop`` (a threading.Event) is set. ``receive()`` waits at most STREAM_POLL
    and returns the text messages completed meanwhile, reassembling fragments and answering ping frames.
    ``heard_at`` is when the last frame arrived. Every failure raises StreamError.
    """

    def __init__(self, url, clock, ssl_context=None, proxy=None, stop=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("not a ws:// or wss:// URL: %r" % url)
        self.url, self.host, self.tls = url, parts.hostname, parts.scheme == "wss"
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path or "/"
        self.ssl_context = ssl_context if ssl_context is not None or not self.tls else ssl.create_default_context()
        self.proxy = proxy
        self.clock = clock
        self.stop = stop or threading.Event()
        self.sock = None
        self.heard_at = 0.0
        self._buffer = bytearray()
        self._fragments, self._fragments_size, self._message_opcode = [], 0, None
        self._upgraded = self._close_sent = False

    # --- opening --------------------------------------------------------------------------------------
    def open(self):
        deadline = self.clock.monotonic() + STREAM_CONNECT_TIMEOUT
        try:
            self._connect_tcp(self.proxy.host if self.proxy else self.host,
                              self.proxy.port if self.proxy else self.port, deadline)
            if self.proxy:
                self._tunnel(deadline)
            if self.tls:
                self.sock = self.ssl_context.wrap_socket(self.sock, server_hostname=self.host,
                                                         do_handshake_on_connect=False)
                self._patiently(self.sock.do_handshake, deadline)
            self._upgrade(deadline)
        except (OSError, StreamError) as exc:
            self.close()
            if isinstance(exc, StreamError):
                raise
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise StreamError("TLS certificate of %s could not be verified (%s)"
                                  % (self.host, exc.verify_message)) from None
            raise StreamError("connection to %s failed: %s" % (self.url, _os_error_text(exc))) from None
        self.heard_at = self.clock.monotonic()
        return self

    def _check(self, deadline):
        if self.stop.is_set():
            raise StreamError("stopped")
        if self.clock.monotonic() >= deadline:
            raise StreamError("%s did not answer within %.0f s" % (self.url, STREAM_CONNECT_TIMEOUT))

    def _patiently(self, operation, deadline):
        """``operation()`` on the socket (timeout STREAM_POLL), retried until done, stopped or too late."""
        while True:
            try:
                return operation()
            except socket.timeout:
                self._check(deadline)

    def _connect_tcp(self, host, port, deadline):
        what = "proxy %s" % self.proxy if self.proxy else "%s:%d" % (host, port)
        try:
            candidates = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise StreamError("cannot resolve %s: %s" % (what, _os_error_text(exc))) from None
        error = None
        for family, kind, proto, _, address in candidates:
            self.sock = socket.socket(family, kind, proto)
            self.sock.setblocking(False)          # so that close() need not wait for a slow connect
            try:
                try:
                    self.sock.connect(address)
                except BlockingIOError:
                    while not _writable(self.sock, STREAM_POLL):
                        self._check(deadline)
                    code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock.settimeout(STREAM_POLL)
                return
            except OSError as exc:
                self.sock.close()
                error = exc
        raise StreamError("cannot connect to %s: %s" % (what, _os_error_text(error)))

    def _read_head(self, deadline):
        """Status line and lower-cased headers of an HTTP answer; what follows stays in the buffer."""
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > 16384:
                raise StreamError("%s answered an overlong HTTP head" % self.url)
            chunk = self._patiently(lambda: self.sock.recv(65536), deadline)
            if not chunk:
                raise StreamError("%s closed the connection during the handshake" % self.url)
            self._buffer += chunk
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return lines[0], headers

    def _tunnel(self, deadline):
        target = "%s:%d" % (self.host, self.port)
        request = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
        request += "".join("%s: %s\r\n" % item for item in self.proxy.headers.items())
        self.sock.sendall((request + "\r\n").encode("latin-1"))
        status_line, _ = self._read_head(deadline)
        if status_line.split(" ")[1:2] != ["200"] or self._buffer:
            raise StreamError("proxy %s refused the tunnel to %s: %s" % (self.proxy, target, status_line))

    def _upgrade(self, deadline):
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        host = "[%s]" % self.host if ":" in self.host else self.host
        if self.port != (443 if self.tls else 80):
            host += ":%d" % self.port
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        % (self.path, host, key)).encode("latin-1"))
        status_line, headers = self._read_head(deadline)
        connection_tokens = [token.strip().lower() for token in headers.get("connection", "").split(",")]
        if status_line.split(" ")[1:2] != ["101"]:
            raise StreamError("%s refused the WebSocket upgrade: %s" % (self.url, status_line))
        if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection_tokens:
            raise StreamError("%s answered 101 without upgrading to WebSocket" % self.url)
        if headers.get("sec-websocket-accept") != websocket_accept(key):
            raise StreamError("%s answered a wrong Sec-WebSocket-Accept" % self.url)
        if headers.get("sec-websocket-extensions"):
            raise StreamError("%s imposed an extension that was not offered" % self.url)
        self._upgraded = True

    # --- frames ---------------------------------------------------------------------------------------
    def send_text(self, text):
        self._send_frame(_OP_TEXT, text.encode("utf-8"))

    def _send_frame(self, opcode, payload):
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)          # RFC 6455 5.3: every client frame is masked with a fresh key
        try:
            self.sock.settimeout(STREAM_SEND_TIMEOUT)
            self.sock.sendall(head + mask + _masked(payload, mask))
            self.sock.settimeout(STREAM_POLL)
        except OSError as exc:
            raise StreamError("sending to %s failed: %s" % (self.url, _os_error_text(exc))) from None

    def receive(self):
        """Wait up to STREAM_POLL for bytes; return the text messages they complete (often none)."""
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return []
        except OSError as exc:
            raise StreamError("connection to %s failed: %s" % (self.url, _os_error_text(exc))) from None
        if not chunk:
            raise StreamError("%s closed the connection without a close frame" % self.url)
        self._buffer += chunk
        messages = []
        frame = self._next_frame()
        while frame is not None:
            text = self._on_frame(*frame)
            if text is not None:
                messages.append(text)
            frame = self._next_frame()
        return messages

    def _next_frame(self):
        """``(fin, opcode, payload)`` of the next complete frame in the buffer, or None."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            self._fail(1002, "reserved bits set, but no extension was negotiated")
        if second & 0x80:
            self._fail(1002, "a server frame was masked")
        length, start = second & 0x7F, 2
        if length >= 126:
            start = 4 if length == 126 else 10
            if len(buffer) < start:
                return None
            length = struct.unpack_from("!H" if start == 4 else "!Q", buffer, 2)[0]
        if self._fragments_size + length > STREAM_MAX_MESSAGE:
            self._fail(1009, "a message is larger than %d bytes" % STREAM_MAX_MESSAGE)
        if len(buffer) < start + length:
            return None
        payload = bytes(buffer[start:start + length])
        del buffer[:start + length]
        return bool(first & 0x80), first & 0x0F, payload

    def _on_frame(self, fin, opcode, payload):
        self.heard_at = self.clock.monotonic()
        if opcode >= _OP_CLOSE:
            if len(payload) > 125 or not fin:
                self._fail(1002, "a control frame was fragmented or too long")
            if opcode == _OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close()
                raise StreamError("OKX closed the connection (code %d %s)"
                                  % (code, payload[2:].decode("utf-8", "replace")))
            if opcode == _OP_PING:
                self._send_frame(_OP_PONG, payload)
            elif opcode != _OP_PONG:
                self._fail(1002, "unknown opcode %d" % opcode)
            return None
        if opcode == _OP_CONT:
            if self._message_opcode is None:
                self._fail(1002, "a continuation frame without a message")
        elif opcode in (_OP_TEXT, _OP_BINARY) and self._message_opcode is None:
            self._message_opcode = opcode
        else:
            self._fail(1002, "unexpected opcode %d" % opcode)
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if not fin:
            return None
        data, opcode = b"".join(self._fragments), self._message_opcode
        self._fragments, self._fragments_size, self._message_opcode = [], 0, None
        if opcode == _OP_BINARY:
            return None               # OKX's streams speak JSON text only
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "a text message is not UTF-8")

    def _fail(self, code, reason):
        self.close(code)
        raise StreamError("%s broke the WebSocket protocol: %s" % (self.url, reason))

    def close(self, code=1000):
        """Send a close frame (once, best effort) and close the socket; safe to call again."""
        if self.sock is None:
            return
        if self._upgraded and not self._close_sent:
            self._close_sent = True
            mask = os.urandom(4)
            try:
                self.sock.settimeout(0.2)
                self.sock.sendall(b"\x88\x82" + mask + _masked(struct.pack("!H", code), mask))
            except OSError:
                pass
        self.sock.close()
        self.sock = None


# --- the thread that keeps a connection open -------------------------------------------------------------

class LiveConnection:
    """One OKX WebSocket URL kept open by a thread of its own for as long as something is wanted of it.

    The common part of the market and account streams. The thread (started by ``_ensure_thread`` when
    something is wanted, ending when nothing is) connects, respecting OKX's limit of
    STREAM_CONNECTS_PER_SECOND new connections per IP address, calls ``_opened(ws)`` (a login, say), then
    loops: ``_turn(ws, now)`` sends what the subclass wants sent, the text ``ping`` goes out after
    STREAM_PING_AFTER of silence, every text message received is handed as JSON to ``_on_message`` (under
    ``_lock``, stamped with its arrival), and the connection is given up after STREAM_DEAD_AFTER without
    a message or a ``pong``. After any loss it calls ``_lost()`` (under the lock: drop what the connection
    held) and reconnects with growing backoff. Answers from memory count only while ``_live(now)``: the
    connection was heard from within STREAM_FRESH_SECONDS. All timing follows the injected clock.
    """

    _connect_times = collections.deque()      # shared: OKX limits new connections per IP, not per stream
    _connect_times_lock = threading.Lock()

    def __init__(self, url, clock, ssl_context=None, proxy=None, name="stream"):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.port == 0:
            raise ValueError("a stream's base must be ws://host[:port] or wss://host[:port], not %r" % url)
        if ssl_context is None and parts.scheme == "wss":
            ssl_context = ssl.create_default_context()
        self.url, self.clock, self.ssl_context, self.proxy, self.name = url, clock, ssl_context, proxy, name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._closed = False
        self._connected = False
        self._heard_at = 0.0
        self._reconnects = 0

    # --- for subclasses -------------------------------------------------------------------------------
    def _wanted(self, now):
        """True while the connection should stay open (called under the lock)."""
        raise NotImplementedError

    def _opened(self, ws):
        """A new connection is up (outside the lock); raise StreamError to give it up."""

    def _turn(self, ws, now):
        """Once per turn of the loop (outside the lock): send what must be sent; False to close."""
        return True

    def _on_message(self, message, now):
        """One JSON message from OKX (under the lock)."""

    def _lost(self):
        """The connection is gone: forget what it held (under the lock)."""

    # --- shared ----------------------------------------------------------------------------------------
    def _ensure_thread(self):
        """Start the thread unless it runs (under the lock)."""
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="okx-" + self.name, daemon=True)
            self._thread.start()

    def _live(self, now):
        return self._connected and not self._closed and now - self._heard_at < STREAM_FRESH_SECONDS

    def heard_ago(self):
        """Seconds since the connection was last heard from, or None while it is down."""
        with self._lock:
            return self.clock.monotonic() - self._heard_at if self._connected else None

    def close(self):
        """Stop the thread and close the connection (waits at most 0.5 s; no answers from memory after)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(0.5)

    def _run(self):
        failures, lost = 0, False     # failures: connections in a row that failed or did not last
        while not self._stop.is_set():
            with self._lock:
                if not self._wanted(self.clock.monotonic()):
                    self._thread = None   # nothing to do: the thread ends, the next use starts another
                    return
            backoff = min(STREAM_BACKOFF_MAX, STREAM_BACKOFF_FIRST * 2 ** (failures - 2)) if failures > 1 else 0.0
            if self.clock.wait(self._stop, backoff) or not self._take_connect_slot():
                break
            ws = WebSocketClient(self.url, self.clock, self.ssl_context, self.proxy, self._stop)
            opened_at = self.clock.monotonic()
            try:
                ws.open()
                self._opened(ws)
            except StreamError as exc:
                ws.close()
                failures += 1
                if not self._stop.is_set():
                    (log.warning if failures & (failures - 1) == 0 else log.debug)(
                        "%s: %s (attempt %d; answering from REST meanwhile)", self.name, exc, failures)
                continue
            log.info("%s connected to %s%s", self.name, self.url, " via proxy %s" % self.proxy if self.proxy else "")
            with self._lock:
                self._connected, self._heard_at = True, ws.heard_at
                self._reconnects += lost
            lost = True
            try:
                self._serve(ws)
                lost = False
            except StreamError as exc:
                if not self._stop.is_set():
                    log.warning("%s lost: %s; reconnecting", self.name, exc)
            except Exception:             # a bug here must not end the stream for good
                log.exception("%s: unexpected error; reconnecting", self.name)
            finally:
                with self._lock:
                    self._connected = False
                    self._lost()
                ws.close()
            if not lost or self.clock.monotonic() - opened_at >= STREAM_STABLE_SECONDS:
                failures = 1 if lost else 0   # the first reconnection after a good connection is immediate
            else:
                failures += 1

    def _take_connect_slot(self):
        """Wait until one more connection stays within OKX's per-IP rate; False when stopping."""
        while True:
            with LiveConnection._connect_times_lock:
                now, times = self.clock.monotonic(), LiveConnection._connect_times
                while times and (times[0] <= now - 1.0 or times[0] > now):   # (another clock's times too)
                    times.popleft()
                if len(times) < STREAM_CONNECTS_PER_SECOND:
                    times.append(now)
                    return True
                wait = times[0] + 1.0 - now
            if self.clock.wait(self._stop, wait):
                return False

    def _serve(self, ws):
        """Run one connection until it fails (StreamError), nothing is wanted any more, or close()."""
        pinged_at = 0.0
        while not self._stop.is_set():
            now = self.clock.monotonic()
            if not self._turn(ws, now):
                return
            if now - max(ws.heard_at, pinged_at) >= STREAM_PING_AFTER:
                ws.send_text("ping")      # OKX's keep-alive is this text, not an RFC 6455 ping frame
                pinged_at = now
            if now - ws.heard_at > STREAM_DEAD_AFTER:
                raise StreamError("no pong from %s for %.0f s" % (self.url, now - ws.heard_at))
            messages = []
            for text in ws.receive():
                if text != "pong":
                    try:
                        messages.append(json.loads(text))
                    except (ValueError, RecursionError):
                        log.debug("%s: ignored a message that is not JSON: %.80r", self.name, text)
            with self._lock:
                self._heard_at = ws.heard_at
                for message in messages:
                    if isinstance(message, dict):
                        self._on_message(message, ws.heard_at)      # stamped with its arrival


# =====================================================================================================
# Live market stream: OKX's public WebSocket, kept in memory for ticker, depth and trades
# =====================================================================================================

STREAM_PATH = "/ws/v5/public"
STREAM_CHECKSUM_LEVELS = 25
STREAM_SYNC_BUFFER = 1000         # `books` updates held while a REST snapshot is being fetched
STREAM_RESUBSCRIBE_MAX = 60.0     # a book that keeps breaking is rebuilt at most this rarely
STREAM_ARGS_PER_REQUEST = 100     # keeps a subscribe request far below OKX's 64 KB
STREAM_REFUSED_RETRY = 60.0       # a channel OKX refused (e.g. 60018) is not asked for again before this
STREAM_IDLE_SCAN = 0.25           # how often subscriptions are checked for idleness

_REFUSED_ARG_RE = re.compile(r"channel:\s*([\w-]+)\s*,\s*instId:\s*([\w.-]+)")


def okx_book_checksum(bids: List[List[str]], asks: List[List[str]]) -> int:
    """OKX's order-book checksum: signed CRC32 of ``bid1px:bid1sz:ask1px:ask1sz:bid2px:...`` (OKX's v5
    docs, WebSocket order book channel; OKX sends 0 instead since June 2026).

    ``bids``/``asks`` are ``[px, sz, ...]`` rows best first, strings exactly as OKX sent them. The best 25
    of each side count; where one side runs out, the other continues alone.
    """
    bids, asks = bids[:STREAM_CHECKSUM_LEVELS], asks[:STREAM_CHECKSUM_LEVELS]
    parts = []
    for i in range(max(len(bids), len(asks))):
        if i < len(bids):
            parts.extend(bids[i][:2])
        if i < len(asks):
            parts.extend(asks[i][:2])
    value = zlib.crc32(":".join(parts).encode("ascii"))
    return value - (1 << 32) if value >= (1 << 31) else value


# --- what the stream keeps -------------------------------------------------------------------------------

class OrderBook:
    """One instrument's `books` order book as OKX sent it, following OKX's seqId chain (OKX's v5 docs,
    WebSocket "Order book channel": sequence ID).

    Each side is ``{Decimal price: level row}`` plus its prices in ascending order; a level row is what OKX
    sent, ``[px, sz, "0", orders]`` as text, so answers (and their ``raw``) and checksums use OKX's own
    strings and shape. ``seq_id`` is None until a snapshot (pushed, or from REST through
    ``load_rest``) made the book complete. ``load``/``apply``/``load_rest`` return False when the book can no
    longer be trusted (a lost message, a non-zero checksum that does not match): it must then be rebuilt.
    Malformed data raises (KeyError, TypeError, ValueError, ArithmeticError).
    """

    def __init__(self):
        self.levels = {"asks": {}, "bids": {}}
        self.prices = {"asks": [], "bids": []}
        self.seq_id = None
        self.ts = ""
        self.pending = []         # updates received before any snapshot, for a sync from REST
        self.fetching = False     # a REST snapshot is being fetched
        self._after_rest = False  # seq_id is a REST snapshot's: the next update may start before it

    @property
    def synced(self):
        return self.seq_id is not None

    def _set(self, data):
        for side in ("asks", "bids"):
            levels, prices = self.levels[side], self.prices[side]
            for row in data[side]:
                level = [str(value) for value in row[:4]]
                price = Decimal(level[0])
                if Decimal(level[1]) == 0:
                    if levels.pop(price, None) is not None:
                        del prices[bisect.bisect_left(prices, price)]
                else:
                    if price not in levels:
                        bisect.insort(prices, price)
                    levels[price] = level
        self.ts = str(data.get("ts", self.ts))

    def _replace(self, data, seq_id):
        self.levels = {"asks": {}, "bids": {}}
        self.prices = {"asks": [], "bids": []}
        self._set(data)
        self.seq_id = seq_id

    def load(self, data):
        """A pushed snapshot: replaces the book."""
        self._replace(data, int(data["seqId"]))
        self.pending, self._after_rest = [], False
        return self._checksum_ok(data)

    def load_rest(self, snapshot):
        """REST ``/market/books`` data[0] (with its integer ``seqId``), then the updates buffered meanwhile:
        those up to the snapshot's seqId are in it already, the first later one must start at or before it
        (``prevSeqId <= seqId < its seqId``) and the rest chain on."""
        self._replace(snapshot, int(snapshot["seqId"]))
        self._after_rest = True
        pending, self.pending = self.pending, []
        return all(self.apply(update) for update in pending)

    def apply(self, data):
        """An update. Legal: ``prevSeqId`` == our seqId, including the no-change heartbeat (seqId equal)
        and the post-maintenance reset (seqId smaller). Anything else means a message was lost."""
        prev_seq_id, seq_id = int(data["prevSeqId"]), int(data["seqId"])
        if self._after_rest:
            if seq_id <= self.seq_id:
                return True
            if prev_seq_id > self.seq_id:
                return False
            self._after_rest = False
        elif prev_seq_id != self.seq_id:
            return False
        self._set(data)
        self.seq_id = seq_id
        return self._checksum_ok(data)

    def _checksum_ok(self, data):
        expected = int(data.get("checksum") or 0)   # 0: OKX sends no checksum (since 2026-06)
        return not expected or okx_book_checksum(self.side("bids", STREAM_CHECKSUM_LEVELS),
                                                 self.side("asks", STREAM_CHECKSUM_LEVELS)) == expected

    def side(self, side, limit):
        """The best ``limit`` level rows of ``side``, best first."""
        prices = self.prices[side]
        chosen = prices[:limit] if side == "asks" else prices[:-limit - 1:-1]
        levels = self.levels[side]
        return [levels[price] for price in chosen]

    def top(self, limit):
        """The best ``limit`` levels a side as REST's ``/market/books`` data[0] has them (copies)."""
        return {"asks": [list(level) for level in self.side("asks", limit)],
                "bids": [list(level) for level in self.side("bids", limit)], "ts": self.ts}


def _trade_order(row):
    try:
        return int(row.get("ts") or 0), int(row.get("tradeId") or 0)
    except (TypeError, ValueError):
        return 0, 0


class TradeTape:
    """The latest trades of one instrument in REST's shape, newest first, unique by tradeId, at most
    OKX_MAX_TRADES. Pushes only bring trades made after the subscription; ``seeded`` is set once REST rows
    fetched while the subscription was live were merged, and from then on the tape has no hole."""

    def __init__(self):
        self.rows = []
        self.seeded = False
        self.seedable = False     # the subscription was live when a caller was sent to REST
        self.covered = set()      # tradeIds inside a pushed aggregate (tradeId T, count n: T-n+1 .. T-1)

    def merge(self, rows):
        """Add pushed or REST rows. A push aggregates the matches of one taker order (``count``); the
        single matches it covers, should REST have listed them, are dropped so no volume counts twice."""
        by_id = {str(row["tradeId"]): row for row in self.rows}
        for row in rows:
            if not isinstance(row, dict) or not row.get("tradeId"):
                continue
            trade_id = str(row["tradeId"])
            count = str(row.get("count") or "1")
            count = min(int(count), OKX_MAX_TRADES) if count.isdigit() and len(count) < 7 else 1
            if count > 1 and trade_id.isdigit():
                self.covered.update(str(int(trade_id) - n) for n in range(1, count))
            elif trade_id in by_id or trade_id in self.covered:
                continue
            by_id[trade_id] = {name: value for name, value in row.items()
                               if name not in ("count", "seqId")}   # not in REST rows
        for trade_id in self.covered.intersection(by_id):
            del by_id[trade_id]
        self.rows = sorted(by_id.values(), key=_trade_order, reverse=True)[:OKX_MAX_TRADES]
        if len(self.covered) > 4 * OKX_MAX_TRADES:       # forget what lies below the oldest row kept
            ids = [int(row["tradeId"]) for row in self.rows if str(row["tradeId"]).isdigit()]
            self.covered = set(t for t in self.covered if ids and int(t) >= min(ids))


# --- the stream ----------------------------------------------------------------------------------------

class _Subscription:
    """What the market stream knows of one (channel, instId): when a robot last asked for it, where its
    subscription stands on the current connection, and what it holds."""

    __slots__ = ("asked_at", "state", "held", "refused_until", "rebuild_at", "rebuilt")

    def __init__(self, now):
        self.asked_at = now
        self.state = None          # None: not sent on this connection; "asked": sent; "live": acknowledged
        self.held = None           # ticker row | books5 {asks, bids, ts} | OrderBook | TradeTape
        self.refused_until = 0.0   # OKX refused it (60018, say): not asked again before this
        self.rebuild_at = None     # when its book is to be rebuilt (unsubscribe + subscribe)
        self.rebuilt = (None, 0.0)  # (time, delay) of its last rebuild, to back off repeated ones


class MarketStream(LiveConnection):
    """OKX's public WebSocket at one ws base URL, shared by every robot: ticker, depth and trades from memory.

    ``ticker``/``depth``/``trades`` never do I/O: each records that its (channel, instId) was asked for,
    queues the subscription for the stream's thread (started on first use), and answers from memory only
    while the connection is proven alive (a message or pong within STREAM_FRESH_SECONDS) and the data is
    complete; otherwise None, and the caller asks REST. The thread subscribes (``tickers``; ``books5`` for
    depth up to 5, else ``books``; ``trades``), keeps the ``books`` books in sequence (rebuilding one that
    breaks), unsubscribes what nobody asked for in ``idle_seconds``, and after any loss discards what it
    held and subscribes again on a new connection. Answers carry OKX's rows as REST has them.
    """

    def __init__(self, ws_base, clock, ssl_context=None, proxy=None, idle_seconds=DEFAULT_STREAM_IDLE,
                 rest_book=None):
        super().__init__(ws_base.rstrip("/") + STREAM_PATH, clock, ssl_context, proxy, name="market stream")
        self.idle_seconds, self.rest_book = idle_seconds, rest_book
        self._subscriptions = {}      # (channel, instId) -> _Subscription
        self._requests = collections.OrderedDict()   # our request id -> its keys (errors carry no arg)
        self._rest_results = []       # (key, book, snapshot or None, error or None) from sync threads
        self._request_id = 0
        self._next_idle_scan = 0.0
        self._served = 0

    # --- what robots call -----------------------------------------------------------------------------
    def ticker(self, inst_id):
        """OKX's ticker row (REST ``/market/ticker`` data[0] fields) from memory, or None."""
        with self._lock:
            held = self._ask(("tickers", inst_id))
            if held is None:
                return None
            self._served += 1
            return dict(held)

    def depth(self, inst_id, limit):
        """REST ``/market/books`` data[0] from memory: ``{"asks": [[px, sz, "0", orders], ...] ascending,
        "bids": [...] descending, "ts"}``, at most ``limit`` levels a side, or None. Up to 5 levels come from
        ``books5`` (or a synced ``books``), more from ``books``."""
        with self._lock:
            held = self._ask(("books5" if limit <= 5 else "books", inst_id))
            if limit <= 5 and held is not None:
                answer = {"asks": [list(level) for level in held["asks"][:limit]],
                          "bids": [list(level) for level in held["bids"][:limit]], "ts": held["ts"]}
            else:
                book = held if limit > 5 else self._held(("books", inst_id))
                if book is None or not book.synced or limit > OKX_MAX_DEPTH:
                    return None
                answer = book.top(limit)
            self._served += 1
            return answer

    def trades(self, inst_id, limit):
        """The ``limit`` latest trades (REST rows: instId, tradeId, px, sz, side, ts), newest first, or None:
        then the caller fetches REST and hands the rows to ``seed_trades``."""
        with self._lock:
            tape = self._ask(("trades", inst_id))
            if tape is None:
                return None
            if not tape.seeded or len(tape.rows) < limit:
                tape.seedable = True      # REST read after this moment overlaps the pushes: no hole
                return None
            self._served += 1
            return [dict(row) for row in tape.rows[:limit]]

    def seed_trades(self, inst_id, rows):
        """REST trade rows (newest first) fetched after ``trades`` answered None: merged with the pushes
        when the subscription was live before that answer (else ignored: REST again next time)."""
        with self._lock:
            tape = self._held(("trades", inst_id))
            if tape is not None and tape.seedable:
                tape.merge(rows)
                tape.seeded = True

    def stats(self):
        """``{"connected", "subscriptions" (acknowledged), "served_from_memory", "reconnects"}``."""
        with self._lock:
            return {"connected": self._connected,
                    "subscriptions": sum(1 for sub in self._subscriptions.values() if sub.state == "live"),
                    "served_from_memory": self._served, "reconnects": self._reconnects}

    def status(self):
        """What GET /status shows of this stream."""
        with self._lock:
            now = self.clock.monotonic()
            live = sorted("%s:%s" % key for key, sub in self._subscriptions.items() if sub.state == "live")
            return {"url": self.url, "live": self._live(now), "subscriptions": live,
                    "last_message_age": round(now - self._heard_at, 3) if self._connected else None,
                    "served_from_memory": self._served, "reconnects": self._reconnects}

    def _ask(self, key):
        """Record that a robot asked for ``key`` (under the lock); what the stream holds for it if that can
        be trusted now, else None."""
        now = self.clock.monotonic()
        sub = self._subscriptions.get(key)
        if sub is None:
            if self._closed:
                return None
            sub = self._subscriptions[key] = _Subscription(now)
            self._ensure_thread()
        sub.asked_at = now
        return sub.held if self._live(now) else None

    def _held(self, key):
        sub = self._subscriptions.get(key)
        return sub.held if sub is not None and self._live(self.clock.monotonic()) else None

    # --- the stream's thread (LiveConnection's hooks) ------------------------------------------------
    def _wanted(self, now):
        self._expire_idle(now)
        return bool(self._subscriptions)

    def _turn(self, ws, now):
        with self._lock:
            self._apply_rest_results(now)
            unsubscribe, subscribe = self._plan(now)
            if not self._subscriptions:
                return False
        self._send_request(ws, "unsubscribe", unsubscribe)
        self._send_request(ws, "subscribe", subscribe)
        return True

    def _lost(self):
        for sub in self._subscriptions.values():
            sub.state, sub.held, sub.rebuild_at = None, None, None
        self._requests.clear()
        self._rest_results = []

    def _expire_idle(self, now):
        """Forget what nobody asked for in ``idle_seconds``; return those of them that are subscribed."""
        subscribed = []
        if now >= self._next_idle_scan:
            self._next_idle_scan = now + min(STREAM_IDLE_SCAN, self.idle_seconds / 4)
            for key, sub in list(self._subscriptions.items()):
                if now - sub.asked_at > self.idle_seconds:
                    del self._subscriptions[key]
                    if sub.state is not None:
                        subscribed.append(key)
        return subscribed

    def _plan(self, now):
        """What to send now, as (keys to unsubscribe, keys to subscribe)."""
        unsubscribe, subscribe = self._expire_idle(now), []
        for key, sub in self._subscriptions.items():
            if sub.rebuild_at is not None and sub.rebuild_at <= now:
                sub.rebuild_at = None
                if sub.state is not None:
                    unsubscribe.append(key)
                subscribe.append(key)
                sub.state = "asked"
            elif sub.state is None and sub.refused_until <= now:
                subscribe.append(key)
                sub.state = "asked"
        return unsubscribe, subscribe

    def _send_request(self, ws, op, keys):
        for start in range(0, len(keys), STREAM_ARGS_PER_REQUEST):
            chunk = keys[start:start + STREAM_ARGS_PER_REQUEST]
            self._request_id += 1
            with self._lock:
                self._requests[str(self._request_id)] = chunk
                while len(self._requests) > 100:
                    self._requests.popitem(last=False)
            args = [{"channel": channel, "instId": inst_id} for channel, inst_id in chunk]
            ws.send_text(json.dumps({"id": str(self._request_id), "op": op, "args": args}, separators=(",", ":")))

    # --- what OKX sends (under the lock) --------------------------------------------------------------
    def _on_message(self, message, now):
        if "event" in message:
            return self._on_event(message, now)
        arg, data = message.get("arg"), message.get("data")
        if not isinstance(arg, dict) or not isinstance(data, list) or not data:
            return
        key = (arg.get("channel"), arg.get("instId"))
        sub = self._subscriptions.get(key)
        if sub is None or sub.state is None:
            return                        # a late push for something unsubscribed
        try:
            self._on_push(key, sub, message.get("action"), data, now)
        except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("market stream: malformed %s push for %s (%s: %s)", key[0], key[1],
                        type(exc).__name__, exc)
            self._rebuild(sub, now)

    def _on_event(self, message, now):
        event, code = message.get("event"), str(message.get("code", ""))
        if event == "subscribe":
            arg = message.get("arg") if isinstance(message.get("arg"), dict) else {}
            key = (arg.get("channel"), arg.get("instId"))
            sub = self._subscriptions.get(key)
            if sub is not None and sub.state is not None:
                sub.state = "live"
                if key[0] == "books":     # its first push must be a snapshot; older pushes are ignored
                    sub.held = OrderBook()
                elif key[0] == "trades" and sub.held is None:
                    sub.held = TradeTape()
        elif event == "error":
            text = str(message.get("msg", ""))
            match = _REFUSED_ARG_RE.search(text)
            keys = [match.groups()] if match else self._requests.get(str(message.get("id")), [])
            log.warning("market stream: OKX refused a request (%s: %s)", code, text[:200])
            for key in keys:
                sub = self._subscriptions.get(tuple(key))
                if sub is not None and sub.state == "asked":
                    sub.state, sub.refused_until = None, now + STREAM_REFUSED_RETRY
        elif event == "notice" and code == "64008":
            raise StreamError("OKX announced a service upgrade (64008)")

    def _on_push(self, key, sub, action, data, now):
        channel = key[0]
        if channel == "tickers":
            sub.held = dict(data[-1])
        elif channel == "books5":
            top = data[-1]
            sub.held = {"asks": [[str(value) for value in row[:4]] for row in top["asks"]],
                        "bids": [[str(value) for value in row[:4]] for row in top["bids"]],
                        "ts": str(top.get("ts", ""))}
        elif channel == "trades":
            if sub.held is None:
                sub.held = TradeTape()
            sub.held.merge(data)
        elif channel == "books":
            book = sub.held
            if book is None:
                return                    # until the (re)subscription's ack: pushes of the old one
            for update in data:
                if action == "snapshot":
                    intact = book.load(update)
                elif book.synced:
                    intact = book.apply(update)
                else:
                    intact = self._sync_from_rest(key, book, update)
                if not intact:
                    log.info("market stream: %s book broke (lost message or checksum); rebuilding", key[1])
                    return self._rebuild(sub, now)

    def _sync_from_rest(self, key, book, update):
        """A `books` stream that began without a snapshot: buffer its updates and fetch a REST snapshot
        (in another thread, as REST may take seconds); False when that cannot work."""
        book.pending.append(update)
        if self.rest_book is None or len(book.pending) > STREAM_SYNC_BUFFER:
            return False
        if not book.fetching:
            book.fetching = True
            threading.Thread(target=self._fetch_rest_book, args=(key, book), name="okx-stream-sync",
                             daemon=True).start()
        return True

    def _fetch_rest_book(self, key, book):
        try:
            snapshot, error = self.rest_book(key[1]), None
        except Exception as exc:          # whatever the callback raises, the stream goes on
            snapshot, error = None, exc
        with self._lock:
            self._rest_results.append((key, book, snapshot, error))

    def _apply_rest_results(self, now):
        results, self._rest_results = self._rest_results, []
        for key, book, snapshot, error in results:
            sub = self._subscriptions.get(key)
            if sub is None or sub.held is not book or book.synced:
                continue                  # rebuilt or snapshotted meanwhile
            book.fetching = False
            try:
                intact = error is None and book.load_rest(snapshot)
            except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
                intact, error = False, exc
            if not intact:
                log.info("market stream: could not sync the %s book from REST (%s); resubscribing",
                         key[1], error or "its seqId does not meet the stream's")
                self._rebuild(sub, now)

    def _rebuild(self, sub, now):
        """Drop what is held for a subscription and resubscribe it; again and again only with growing delays."""
        sub.held = None
        last, delay = sub.rebuilt
        if last is None or now - last > STREAM_RESUBSCRIBE_MAX + delay:
            delay = 0.0
        else:
            delay = min(STREAM_RESUBSCRIBE_MAX, max(1.0, delay * 2))
        sub.rebuilt = (now + delay, delay)
        sub.rebuild_at = now + delay


# =====================================================================================================
# Live account stream: OKX's private WebSocket, one per API key, for balances, positions and orders
# =====================================================================================================

ACCOUNT_STREAM_PATH = "/ws/v5/private"
LOGIN_TIMEOUT = 5.0               # seconds OKX has to answer a login
LOGIN_RETRY_FIRST = 30.0          # a refused login is tried again after this, doubling each time...
LOGIN_RETRY_MAX = 600.0           # ...up to this: a wrong key never makes a reconnect loop
ORDER_PUSH_WAIT = 3.0             # a push awaited this long never comes: what it was awaited for is re-read
ORDERS_RELOAD_RETRY = 5.0         # a failed REST read of open orders is tried again after this
FINISHED_ORDERS_KEPT = 1000       # finished orders of this connection kept for `order` (the newest)
ACCOUNT_CHANNELS = ({"channel": "account"}, {"channel": "positions", "instType": "ANY"},
                    {"channel": "orders", "instType": "ANY"})

# OKX's rank of order states: a push never takes an order back to a lower one (OKX's v5 docs, orders
# channel: "filled", "canceled", "mmp_canceled" are final).
STATE_RANK = {"live": 0, "partially_filled": 1, "filled": 2, "canceled": 2, "mmp_canceled": 2}
# Fields of an orders push that REST's order rows do not have (they describe one push, not the order).
PUSH_ONLY_FIELDS = ("amendResult", "amendSource", "code", "msg", "reqId", "execType", "fillFee", "fillFeeCcy",
                    "fillNotionalUsd", "fillPnl", "fillMarkPx", "fillIdxPx", "fillFwdPx", "fillMarkVol",
                    "fillPxVol", "fillPxUsd", "fillMarkPxUsd", "lastPx", "notionalUsd", "pTime")


def login_request(credentials: "Credentials", timestamp: str) -> str:
    """OKX's WebSocket login frame: the signature of ``timestamp + "GET" + "/users/self/verify"``, the
    timestamp in whole seconds of OKX's time. Never logged: it carries the passphrase."""
    sign = sign_request(credentials.secret, timestamp, "GET", "/users/self/verify")
    return json.dumps({"op": "login", "args": [{"apiKey": credentials.api_key, "passphrase": credentials.passphrase,
                                                "timestamp": timestamp, "sign": sign}]}, separators=(",", ":"))


_SIGNATURE_SHAPE = re.compile(r"[A-Za-z0-9+/]{43}=")     # a base64 HMAC-SHA256, as OKX's sign


def scrubbed(text: str, credentials: "Credentials") -> str:
    """OKX's message about a login, safe to log: OKX may repeat the request it refused, whole or in part
    (60012 "Invalid request: {...}", "Invalid sign: ..."), and the login frame carries the key, the passphrase
    and a signature. So any JSON in it is cut, and the credentials and anything shaped like a signature (an
    HMAC-SHA256 in base64) are masked."""
    cut = min((at for at in (text.find("{"), text.find("[")) if at >= 0), default=-1)
    if cut >= 0:
        text = text[:cut].rstrip(" :") + " (OKX repeated the login request: not shown)"
    for secret in (credentials.passphrase, credentials.secret, credentials.api_key):
        if secret and secret in text:
            text = text.replace(secret, "***")
    return _SIGNATURE_SHAPE.sub("***", text)[:200]


class LoginRefused(StreamError):
    """OKX refused the private stream's login: ``code`` is OKX's."""

    def __init__(self, code, message):
        hint = ERROR_HINTS.get(code)
        super().__init__("OKX refused the login (%s: %s)%s" % (code, message or "(no message)",
                                                                " (hint: %s)" % hint if hint else ""))
        self.code = code


def _rank(row):
    return STATE_RANK.get(row.get("state"), 0)


def _filled(row):
    try:
        return Decimal(row.get("accFillSz") or 0)
    except ArithmeticError:
        return Decimal(0)


def supersedes(stored: Optional[Dict[str, Any]], row: Dict[str, Any]) -> bool:
    """True when order ``row`` may replace the ``stored`` one: OKX's rules against duplicate and
    out-of-order pushes (a final state stays final, what filled never shrinks, a state never goes back, and
    of two rows in one state the later change, by uTime, wins)."""
    if stored is None:
        return True
    if _rank(stored) == 2:
        return False
    if _filled(row) != _filled(stored):
        return _filled(row) > _filled(stored)
    if _rank(row) != _rank(stored):
        return _rank(row) > _rank(stored)
    return _ms(row.get("uTime")) >= _ms(stored.get("uTime"))     # the same state: the later change


IMMEDIATE_ORDER_TYPES = ("market", "ioc", "fok", "optimal_limit_ioc")   # they fill (or end) at once


def _settled(row):
    """True when an order's push shows how its placing ended: a resting order's first push, an order that
    fills at once (market, IOC, FOK) only in its final state, as its fills' pushes may still be coming."""
    return row is not None and (row.get("ordType") not in IMMEDIATE_ORDER_TYPES or _rank(row) == 2)


def rest_order_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """An orders push as REST's order row: without the push-only fields, ``avgPx`` "" while nothing filled."""
    rest = {name: value for name, value in row.items() if name not in PUSH_ONLY_FIELDS}
    if rest.get("avgPx") in ("0", 0) and _filled(rest) == 0:
        rest["avgPx"] = ""
    return rest


class AccountStream(LiveConnection):
    """OKX's private WebSocket for one API key: its balances, positions and orders kept in memory.

    Opened on the first private read of the key, closed after ``idle_seconds`` without one. On each
    connection: log in (signed with OKX's time), wait for the answer, subscribe ``account``, ``positions``
    and ``orders`` (instType ANY). OKX pushes a snapshot of balances and of positions on subscribe, and
    nothing for orders, so open orders are read from REST (every page) after the acknowledgement. Memory
    answers only while the connection is alive (as the market stream) and that channel is in sync; after
    any loss everything is dropped and synced again. Snapshots replace, updates merge, and order pushes
    follow ``supersedes``. Read your writes: an order or cancel this plugin made is read from REST until its
    own push has arrived, and balances (positions) after any order change until the balance (position) push
    that follows it, each wait ORDER_PUSH_WAIT at most. Messages are ordered by their arrival on the
    connection, never by a clock. Reads return None whenever memory cannot answer: the caller then asks REST.
    """

    def __init__(self, ws_base, clock, credentials, exchange_clock, load_open_orders, sync_clock=None,
                 ssl_context=None, proxy=None, idle_seconds=DEFAULT_STREAM_IDLE):
        super().__init__(ws_base.rstrip("/") + ACCOUNT_STREAM_PATH, clock, ssl_context, proxy,
                         name="account stream %s..." % credentials.api_key[:4])
        self.credentials, self.exchange_clock, self.sync_clock = credentials, exchange_clock, sync_clock
        self.load_open_orders, self.idle_seconds = load_open_orders, idle_seconds
        self._asked_at = 0.0
        self._refused_until, self._login_retry, self.login_error = 0.0, LOGIN_RETRY_FIRST, None
        self._served = 0
        self._amends = collections.OrderedDict()     # reqId -> [Event, result]: kept across reconnects
        self._lost()

    # --- what robots call (each returns None when memory cannot answer) ---------------------------------
    def balance(self):
        """REST ``/account/balance`` data, ``[{account fields..., "details": [per currency]}]``, and its JSON."""
        with self._lock:
            now = self._ask()
            if not self._trusted("account", now) or self._awaiting(now, "account"):
                return None
            self._served += 1
            return self._answer(("account",), lambda: [dict(self._account, details=sorted(
                self._details.values(), key=lambda row: row.get("ccy", "")))])

    def positions(self, inst_id=None):
        """REST ``/account/positions`` rows (of one instId when given)."""
        with self._lock:
            now = self._ask()
            if not self._trusted("positions", now) or self._awaiting(now, "positions"):
                return None
            self._served += 1
            return self._answer(("positions", inst_id), lambda: sorted(   # as REST: newest first
                (row for row in self._positions.values() if inst_id in (None, row.get("instId"))),
                key=lambda row: _ms(row.get("cTime")), reverse=True))

    def open_orders(self, inst_id=None):
        """REST ``/trade/orders-pending`` rows (of one instId when given), newest first."""
        with self._lock:
            now = self._ask()
            if not self._orders_trusted(now) or any(inst_id in (None, awaited[0])
                                                    for awaited in self._awaited.values()):
                return None
            self._served += 1
            return self._answer(("orders", inst_id), lambda: sorted(
                (row for row in self._orders.values() if _rank(row) < 2 and inst_id in (None, row.get("instId"))),
                key=lambda row: _ms(row.get("ordId")), reverse=True))

    def order(self, inst_id, ord_id):
        """REST ``/trade/order`` row of one order this connection knows, or None."""
        with self._lock:
            now = self._ask()
            if not self._orders_trusted(now):
                return None
            row = self._orders.get(ord_id)
            if row is None or row.get("instId") != inst_id or ord_id in self._awaited:
                return None
            self._served += 1
            return self._answer(("order", ord_id), lambda: row)

    def wrote(self, inst_id, ord_id, cancel=False, since=None):
        """OKX answered an order (``ord_id``), its cancel, or its amendment (``since``: the ``mark()`` taken
        before sending it). Until that order's own push arrives (with a final state, for a cancel; any push
        after ``since``, for an amendment), ``order`` and ``open_orders`` of its instrument, ``balance``, and
        for a contract ``positions``, leave it to REST; then they wait for the balance (position) push that
        follows it."""
        with self._lock:
            if not self._connected:
                return                    # memory answers nothing now: a new connection syncs from REST
            if self._channels.get("orders") != "live":
                # No order push can come (orders are read from REST), but a balance (position) push does:
                # until it comes, ORDER_PUSH_WAIT at most, those channels leave the write to REST too.
                now = self.clock.monotonic()
                self._due["account"] = (self._seq, now)
                if inst_type_of(inst_id) != "SPOT":
                    self._due["positions"] = (self._seq, now)
                return
            if cancel:
                row = self._orders.get(ord_id)
                if row is not None and _rank(row) == 2:
                    return                # OKX already said how it ended
            elif since is not None:
                if self._order_heard.get(ord_id, -1) > since:
                    return                # pushed since the amendment was sent
            elif ord_id in self._order_heard and _settled(self._orders.get(ord_id)):
                return                    # its push came before the answer
            self._awaited[ord_id] = (inst_id, self.clock.monotonic(), cancel, since)

    def mark(self):
        """The point in the connection's messages that ``wrote(since=...)`` counts from."""
        with self._lock:
            return self._seq

    def wrote_through_io(self):
        """An order endpoint was called through exchange.IO: its pushes cannot be matched to it, so balances,
        positions and orders are read from REST for ORDER_PUSH_WAIT."""
        with self._lock:
            self._io_write_until = self.clock.monotonic() + ORDER_PUSH_WAIT

    def _answer(self, key, rows):
        """``(rows(), their JSON)``, both kept until the next push (under the lock): many robots reading
        one unchanged answer cost one encoding. The rows are the stored ones: they are replaced, never
        changed, when a push comes."""
        cached = self._answers.get(key)
        if cached is None:
            value = rows()
            cached = self._answers[key] = (value, EncodedJSON(dumps(value)))
        return cached

    def expect_amend(self, req_id):
        """An amendment with ``req_id`` is about to be sent: its result push is kept for ``amend_result``."""
        waiter = (req_id, threading.Event())
        with self._lock:
            self._amends[req_id] = [waiter[1], None]
            while len(self._amends) > 100:            # waiters that never asked for their result
                del self._amends[next(iter(self._amends))]
        return waiter

    def amend_result(self, waiter):
        """``(amendResult, code, msg)`` pushed for the amendment, waiting up to AMEND_PUSH_WAIT while the
        connection is live; None when none came (then read the order back)."""
        req_id, event = waiter
        with self._lock:
            live = self._trusted("orders", self.clock.monotonic())
        if live:
            self.clock.wait(event, AMEND_PUSH_WAIT)
        with self._lock:
            entry = self._amends.pop(req_id, None)
        return entry[1] if entry else None

    def status(self):
        """What GET /status shows of this stream (the key by its first 4 characters only)."""
        with self._lock:
            now = self.clock.monotonic()
            return {"key": self.credentials.api_key[:4] + "...", "demo": self.credentials.demo, "url": self.url,
                    "live": self._live(now), "login": self.login_error or ("ok" if self._connected else None),
                    "subscriptions": sorted(channel for channel, state in self._channels.items() if state == "live"),
                    "synced": {channel: self._trusted(channel, now) for channel in ("account", "positions", "orders")},
                    "last_message_age": round(now - self._heard_at, 3) if self._connected else None,
                    "served_from_memory": self._served, "reconnects": self._reconnects}

    def idle(self):
        """True when no robot read this key for ``idle_seconds`` and the connection is closed."""
        with self._lock:
            return self._thread is None and self.clock.monotonic() - self._asked_at > self.idle_seconds

    def _ask(self):
        """Record a read (under the lock), starting the connection when it is down; returns now."""
        now = self.clock.monotonic()
        self._asked_at = now
        if now >= self._refused_until and not self._closed:
            self._ensure_thread()
        return now

    def _trusted(self, channel, now):
        return self._live(now) and self._channels.get(channel) == "live" and self._synced.get(channel, False)

    def _orders_trusted(self, now):
        return (self._trusted("orders", now) and not self._drop_overdue(now)
                and now >= self._io_write_until)

    def _drop_overdue(self, now):
        """Forget the writes whose push never came within ORDER_PUSH_WAIT, and read the open orders again
        (under the lock); True when there were such."""
        overdue = [ord_id for ord_id, awaited in self._awaited.items() if now - awaited[1] > ORDER_PUSH_WAIT]
        if not overdue:
            return False
        log.warning("%s: no push for order %s; reading open orders again", self.name, overdue[0])
        for ord_id in overdue:
            del self._awaited[ord_id]
        self._reload_orders(now)
        return True

    def _awaiting(self, now, channel):
        """True while ``channel`` (account, positions) may not yet show an order change: a write of this
        plugin awaits its order push (for positions: on a contract), or an order change was pushed and the
        channel's push that follows it has not come. Each wait lasts ORDER_PUSH_WAIT at most."""
        self._drop_overdue(now)
        if now < self._io_write_until:
            return True               # an order written through exchange.IO: its pushes are not matched
        if any(channel == "account" or inst_type_of(awaited[0]) != "SPOT" for awaited in self._awaited.values()):
            return True
        due = self._due.get(channel)
        return due is not None and self._heard_seq.get(channel, -1) <= due[0] and now - due[1] < ORDER_PUSH_WAIT

    # --- the connection (LiveConnection's hooks) ---------------------------------------------------------
    def _wanted(self, now):
        return now >= self._refused_until and now - self._asked_at <= self.idle_seconds

    def _lost(self):
        """Drop everything the connection held (also the initial state)."""
        self._channels = {}               # channel -> "asked" | "live" | "refused"
        self._synced = {}                 # channel -> True once memory holds all of it
        self._account, self._details = {}, collections.OrderedDict()
        self._positions = collections.OrderedDict()      # position key -> REST row
        self._pages = {}                  # channel -> pages of a snapshot being received
        self._orders = collections.OrderedDict()         # ordId -> REST row (open, and finished lately)
        self._seq = 0                     # messages received on this connection: their order of arrival
        self._answers = {}                # (read, filter) -> (rows, JSON) served since the last message
        self._order_heard = LastUsed(FINISHED_ORDERS_KEPT)   # ordId -> the seq of its last push
        self._awaited = {}                # ordId -> (instId, answered at, cancel?, amendment's mark or None)
        self._io_write_until = -1.0       # reads go to REST until then, after an exchange.IO order call
        self._heard_seq = {}              # channel -> the seq of its last push
        self._due = {}                    # channel -> (seq, time) of an order change it has yet to follow
        self._orders_load_seq = 0         # the seq at which the last REST read of open orders began
        self._orders_loading = False
        self._orders_results = []
        self._reload_at = None


    def _opened(self, ws):
        """Log in, wait for OKX's answer, then subscribe the three channels."""
        timestamp = str(int(self.exchange_clock.now_ms() // 1000))
        ws.send_text(login_request(self.credentials, timestamp))
        deadline = self.clock.monotonic() + LOGIN_TIMEOUT
        while True:
            for text in ws.receive():
                try:
                    message = json.loads(text)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(message, dict):
                    continue
                code = str(message.get("code", ""))
                if message.get("event") == "login" and code == "0":
                    return self._logged_in(ws)
                if message.get("event") in ("login", "error"):
                    self._refused(code, scrubbed(str(message.get("msg", "")), self.credentials))
            if self.clock.monotonic() > deadline or self._stop.is_set():
                raise StreamError("OKX did not answer the login within %.0f s" % LOGIN_TIMEOUT)

    def _logged_in(self, ws):
        with self._lock:
            self.login_error, self._login_retry = None, LOGIN_RETRY_FIRST
            for arg in ACCOUNT_CHANNELS:
                self._channels[arg["channel"]] = "asked"
        ws.send_text(json.dumps({"id": "1", "op": "subscribe", "args": list(ACCOUNT_CHANNELS)},
                                separators=(",", ":")))

    def _refused(self, code, message):
        """A refused login: REST for this key, and no new attempt for a while (growing)."""
        with self._lock:
            self.login_error = "refused (%s)" % code
            # OKX said our time is off (60006): the clock is synced and the first such refusal retried at once
            retry = 1.0 if code == "60006" and self._login_retry == LOGIN_RETRY_FIRST else self._login_retry
            self._refused_until = self.clock.monotonic() + retry
            self._login_retry = min(LOGIN_RETRY_MAX, self._login_retry * 2)
        if code == "60006" and self.sync_clock is not None:     # OKX says our time is off
            self.sync_clock()
        raise LoginRefused(code, "%s; this key is read over REST, next login in %.0f s" % (message, retry))

    def _turn(self, ws, now):
        with self._lock:
            if not self._wanted(now):
                return False
            self._apply_orders_results(now)
            start = self._channels.get("orders") == "live" and not self._synced.get("orders") and \
                not self._orders_loading and (self._reload_at is None or self._reload_at <= now)
            if start:
                self._orders_loading, self._orders_load_seq = True, self._seq
        if start:
            threading.Thread(target=self._load_orders, name="okx-account-sync", daemon=True).start()
        return True

    def _reload_orders(self, now):
        """Read the open orders from REST again (under the lock); memory leaves orders to REST meanwhile."""
        self._synced["orders"] = False
        self._reload_at = now

    def _load_orders(self):
        try:
            rows, error = self.load_open_orders(), None
        except Exception as exc:          # whatever REST raises, the stream goes on
            rows, error = None, exc
        with self._lock:
            self._orders_results.append((rows, error))

    def _apply_orders_results(self, now):
        results, self._orders_results = self._orders_results, []
        for rows, error in results:
            self._orders_loading = False
            if error is not None:
                log.warning("%s: could not read open orders (%s); trying again in %.0f s", self.name, error,
                            ORDERS_RELOAD_RETRY)
                self._reload_at = now + ORDERS_RELOAD_RETRY
                continue
            pending = set()
            for row in rows:
                if isinstance(row, dict) and row.get("ordId"):
                    pending.add(row["ordId"])
                    self._merge_order(row, None)
            for ord_id, row in list(self._orders.items()):
                if _rank(row) < 2 and ord_id not in pending and self._order_heard.get(ord_id, -1) <= \
                        self._orders_load_seq:
                    del self._orders[ord_id]      # not open by the read, nor pushed since it began: ask REST
            self._synced["orders"] = True
            self._answers.clear()                 # the orders changed: no answer kept from before holds

    # --- what OKX sends (under the lock) --------------------------------------------------------------
    def _on_message(self, message, now):
        self._seq += 1
        self._answers.clear()
        event = message.get("event")
        if event is not None:
            return self._on_event(event, message, now)
        arg, data = message.get("arg"), message.get("data")
        if not isinstance(arg, dict) or not isinstance(data, list):
            return
        channel = arg.get("channel")
        try:
            if channel == "orders":
                for row in data:
                    if isinstance(row, dict) and row.get("ordId"):
                        self._note_amend(row)
                        self._merge_order(rest_order_row(row), now)
            elif channel in ("account", "positions"):
                self._on_snapshot_or_update(channel, message, data, now)
        except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("%s: malformed %s push (%s: %s); syncing it again", self.name, channel,
                        type(exc).__name__, exc)
            raise StreamError("malformed %s push" % channel) from None

    def _on_event(self, event, message, now):
        channel = message.get("channel") or (message.get("arg") or {}).get("channel")
        if event == "subscribe" and channel in self._channels:
            self._channels[channel] = "live"
        elif event == "channel-conn-count-error" and channel in self._channels:
            log.warning("%s: OKX ended the %s subscription: more than %s connections of this account use it; "
                        "reading it over REST", self.name, channel, message.get("connCount", "30"))
            self._channels[channel] = "refused"
        elif event == "error":
            log.warning("%s: OKX refused a request (%s: %s)", self.name, message.get("code"),
                        str(message.get("msg", ""))[:200])
            for channel, state in self._channels.items():
                if state == "asked":
                    self._channels[channel] = "refused"
        elif event == "notice" and str(message.get("code")) == "64008":
            raise StreamError("OKX announced a service upgrade (64008)")

    def _on_snapshot_or_update(self, channel, message, data, now):
        # A snapshot replaces what is held; so does a first push without eventType (older servers).
        snapshot = message.get("eventType") == "snapshot" or (message.get("eventType") is None
                                                              and not self._synced.get(channel))
        if snapshot:
            pages = self._pages.setdefault(channel, [])
            pages.extend(data)
            if message.get("lastPage", True) in (False, "false"):
                return                    # more pages of this snapshot follow
            del self._pages[channel]
            if channel == "account":
                self._account, self._details = {}, collections.OrderedDict()
            else:
                self._positions = collections.OrderedDict()
            data = pages
        for row in data:
            if not isinstance(row, dict):
                continue
            if channel == "account":
                self._merge_account(row)
            else:
                self._merge_position(row)
        self._heard_seq[channel] = self._seq
        if snapshot:
            self._synced[channel] = True

    def _merge_account(self, row):
        self._account.update((name, value) for name, value in row.items() if name != "details")
        for detail in row.get("details") or []:
            ccy = detail.get("ccy")
            stored = self._details.get(ccy)
            if ccy and (stored is None or _ms(detail.get("uTime")) >= _ms(stored.get("uTime"))):
                if _is_zero(detail.get("eq") or 0) and _is_zero(detail.get("cashBal") or 0):
                    self._details.pop(ccy, None)      # emptied: REST no longer lists it
                else:
                    self._details[ccy] = dict(detail)

    def _merge_position(self, row):
        key = row.get("posId") or (row.get("instId"), row.get("mgnMode"), row.get("posSide"))
        stored = self._positions.get(key)
        if stored is not None and _ms(row.get("uTime")) < _ms(stored.get("uTime")):
            return                        # an older push than what is held
        if row.get("pos") in ("", None, "0") or Decimal(row["pos"]) == 0:
            self._positions.pop(key, None)
        else:
            self._positions[key] = {name: value for name, value in row.items() if name != "pTime"}

    def _note_amend(self, row):
        """An orders push that carries the result of an amendment this plugin is waiting for."""
        entry = self._amends.get(row.get("reqId"))
        if entry is not None and row.get("amendResult") not in (None, ""):
            entry[1] = (str(row["amendResult"]), str(row.get("code") or ""), str(row.get("msg") or ""))
            entry[0].set()

    def _merge_order(self, row, now):
        """One order row (pushed, ``now`` its arrival; or from REST, ``now`` None) merged by ``supersedes``."""
        ord_id = row["ordId"]
        stored = self._orders.get(ord_id)
        if now is not None:
            self._order_heard[ord_id] = self._seq
            awaited = self._awaited.get(ord_id)
            if awaited is not None and (awaited[3] is not None or not awaited[2] and _settled(row)
                                        or _rank(row) == 2 or stored is not None and _rank(stored) == 2):
                del self._awaited[ord_id]         # the push an order, an amendment or (final) a cancel awaited
        if not supersedes(stored, row):
            return
        if now is not None and (stored is None or _filled(row) != _filled(stored)
                                or any(row.get(field) != stored.get(field) for field in ("state", "px", "sz"))):
            self._due["account"] = (self._seq, now)      # a balance push follows an order's change (or amendment)
            if _filled(row) > _filled(stored or {}) and inst_type_of(row.get("instId", "")) != "SPOT":
                self._due["positions"] = (self._seq, now)    # and a position push a contract's fill
        self._orders[ord_id] = row
        self._orders.move_to_end(ord_id)
        if len(self._orders) > 2 * FINISHED_ORDERS_KEPT:      # forget the oldest finished ones
            finished = [key for key, order in self._orders.items() if _rank(order) == 2]
            for key in finished[:len(finished) - FINISHED_ORDERS_KEPT]:
                del self._orders[key]


# =====================================================================================================
# BaseProtocol: the docker-facing contract
# =====================================================================================================

class Symbol(collections.namedtuple("Symbol", "base quote contract")):
    """A parsed FMZ symbol: ``Symbol("BTC", "USDT", "swap")``; ``contract`` is "" for spot."""

    @property
    def fmz(self):
        """Canonical FMZ form: ``BTC_USDT`` or ``BTC_USDT.swap``."""
        pair = "%s_%s" % (self.base, self.quote)
        return pair + "." + self.contract if self.contract else pair


class DockerRequest:
    """What one docker request carries besides its method and params."""

    def __init__(self, access_key="", secret_key="", nonce=None, http_method=None, deadline=None):
        self.access_key = access_key.strip() if isinstance(access_key, str) else ""
        self.secret_key = secret_key
        self.nonce = nonce
        self.http_method = http_method       # the Http-Method header: the verb of an `__api_` call
        self.deadline = deadline             # monotonic; None: the plugin's --timeout from now


class BaseProtocol:
    """The FMZ custom protocol as the docker speaks it: one method per docker method.

    A wrapper for one exchange subclasses this and overrides what the exchange can do. Each method takes
    the call's parsed parameters (see DISPATCH) and returns ``(data, raw)``: ``data`` in the shape
    documented here, which the docker turns into the strategy's structure; ``raw`` the exchange's own
    answer (FMZ shows it as ``Info``), or None. Failures raise ProtocolError. Prices and amounts are
    decimal strings, times integers in milliseconds unless stated otherwise. The defaults answer a clear
    NotSupported error.
    """

    #: the name in the service address, e.g. ``http://127.0.0.1:6666/OKX``
    name = "base"

    def __init__(self, request):
        self.request = request

    def _unsupported(self, what):
        raise NotSupported("%s is not supported by the %s plugin" % (what, self.name))

    # --- market data ----------------------------------------------------------------------------------
    def ticker(self, symbol):
        """``{symbol, buy, sell, high, low, open, last, vol, time}``: best bid and ask, 24 h high, low,
        open, last price, 24 h volume (base currency; contracts for futures)."""
        self._unsupported("ticker")

    def depth(self, symbol, limit):
        """``{time, asks: [[price, amount], ...], bids: [...]}``: asks ascending, bids descending,
        at most ``limit`` levels a side."""
        self._unsupported("depth")

    def trades(self, symbol, limit):
        """``[{id, time, price, amount, type}, ...]`` newest first; ``type`` is the taker side buy/sell."""
        self._unsupported("trades")

    def records(self, symbol, period, limit):
        """``[[time_seconds, open, high, low, close, volume], ...]`` oldest first, the unfinished bar last;
        ``period`` in minutes, ``limit`` bars."""
        self._unsupported("records")

    def tickers(self, contract, family=None):
        """``[{symbol, buy, sell, high, low, open, last, vol, time}, ...]`` for every instrument of a kind
        (options: of one underlying ``family``)."""
        self._unsupported("tickers")

    def markets(self, contract, family=None):
        """``{fmz_symbol: {symbol, baseAsset, quoteAsset, tickSize, amountSize, pricePrecision,
        amountPrecision, minQty, maxQty, minNotional, maxNotional, ctVal, ctValCcy}, ...}``."""
        self._unsupported("markets")

    # --- account and orders ---------------------------------------------------------------------------
    def accounts(self):
        """``[{currency, free, frozen}, ...]`` of the trading account."""
        self._unsupported("accounts")

    def assets(self):
        """Same shape as ``accounts``."""
        self._unsupported("assets")

    def trade(self, symbol, type, price, amount, direction=None, leverage=None):
        """Place an order; ``{id}``. ``price`` "-1" is a market order. ``type`` buy/sell, and for futures
        closebuy/closesell (or buy/sell with ``direction`` closebuy/closesell)."""
        self._unsupported("trade")

    def orders(self, symbol):
        """``[{id, symbol, amount, price, deal_amount, avg_price, type, status}, ...]``: open orders."""
        self._unsupported("orders")

    def order(self, id, symbol):
        """``{id, symbol, amount, price, deal_amount, avg_price, type, status}`` of one order."""
        self._unsupported("order")

    def historyorders(self, symbol, since, limit):
        """Finished orders as ``orders`` lists them, newest first; ``since`` ms (0: none)."""
        self._unsupported("historyorders")

    def cancel(self, id, symbol):
        """Cancel an order; ``true``."""
        self._unsupported("cancel")

    def modifyorder(self, id, symbol, price, amount, type=None):
        """Move a resting order to a new ``price`` and/or ``amount`` ("-1" keeps either); ``{id}``."""
        self._unsupported("ModifyOrder")

    # --- futures --------------------------------------------------------------------------------------
    def positions(self, symbol):
        """``[{symbol, margin_level, amount, frozen_amount, price, profit, margin, type, contract_type}]``;
        ``type`` 0 long, 1 short; amounts in contracts."""
        self._unsupported("positions")

    def set_margin_level(self, symbol, margin_level):
        """Set the leverage of a contract; ``true``."""
        self._unsupported("SetMarginLevel")

    def fundings(self, symbol):
        """``[{symbol, rate, time, interval, next_time}, ...]``: funding rate of perpetual swaps."""
        self._unsupported("fundings")

    # --- condition orders --------------------------------------------------------------------------------
    def createconditionorder(self, symbol, type, amount, condition, direction=None):
        """Place an exchange-side condition order (``condition``: a Condition); ``{id}``."""
        self._unsupported("CreateConditionOrder")

    def modifyconditionorder(self, id, symbol, amount, condition, type=None):
        """Change a condition order's amount ("-1" keeps it) and/or the legs ``condition`` sets; ``{id}``."""
        self._unsupported("ModifyConditionOrder")

    def cancelconditionorder(self, id, symbol):
        """Cancel a condition order; ``true``."""
        self._unsupported("CancelConditionOrder")

    def conditionorder(self, id, symbol):
        """One condition order: the order shape plus ``condition`` (``ConditionType``, ``TpTriggerPrice``,
        ``TpOrderPrice``, ``SlTriggerPrice``, ``SlOrderPrice``, numbers as text, "0" when not set)."""
        self._unsupported("GetConditionOrder")

    def conditionorders(self, symbol):
        """Pending condition orders, newest first."""
        self._unsupported("GetConditionOrders")

    def historyconditionorders(self, symbol, since, limit):
        """Finished condition orders, oldest first; ``since`` ms (0: none)."""
        self._unsupported("GetHistoryConditionOrders")

    # --- the older io form, and exchange.IO("api", ...) ------------------------------------------------
    def io(self, code, args, symbol=None):
        """A futures setting in FMZ's older form: an operation ``code`` and its ``args``."""
        self._unsupported("io")

    def api(self, path, params):
        """Any exchange endpoint, signed: the exchange's own JSON answer as ``data``."""
        self._unsupported("exchange.IO passthrough")


# =====================================================================================================
# OKX: each docker method mapped onto OKX v5, in the order of the protocol
# =====================================================================================================

def paged(client: "OKXClient", credentials: "Credentials", path: str, params: Dict[str, Any],
          limit: Optional[int] = None, after: Optional[str] = None, deadline: Optional[float] = None,
          cursor: str = "ordId") -> List[Dict[str, Any]]:
    """Every row (or ``limit`` rows) of one of OKX's paged lists (orders-pending, -history, -archive, the
    algo lists by ``cursor`` algoId), newest first, older than the cursor ``after`` when given."""
    rows = []
    while limit is None or len(rows) < limit:
        page_params = dict(params, limit=OKX_ORDERS_PAGE if limit is None else min(OKX_ORDERS_PAGE, limit - len(rows)))
        if after:
            page_params["after"] = after
        page = client.call("GET", path, page_params, credentials=credentials, deadline=deadline)
        rows.extend(page)
        if len(page) < page_params["limit"] or not page:
            break
        after = page[-1].get(cursor)
    return rows


class OKXShared:
    """What the OKX calls of every robot share: the REST client (transport), the order placer, the leverage
    last set per contract, and the live streams (one per WebSocket host)."""

    def __init__(self, config):
        self.config = config
        self.client = OKXClient(config)
        self.orders = OrderPlacer(self.client)
        self.leverage = LastUsed()        # (api key, demo, margin mode, scope) -> the leverage last set
        self._streams = {}                # ws base URL -> MarketStream (live and demo keys use other hosts)
        self._accounts = {}               # (api key, demo) -> AccountStream
        self._streams_lock = threading.Lock()
        self._tls = None

    def ws_base(self, demo):
        """The WebSocket base for live or demo keys: --ws-base, or the one of --api-base's OKX site."""
        return self.config.ws_base or STREAM_BASES.get(self.client.pool.host, (None, None))[1 if demo else 0]

    def market_stream(self, demo=False):
        """The live market stream for live or demo keys, or None when it is off (--no-stream, or an
        --api-base that is not an OKX site and no --ws-base)."""
        base = self.ws_base(demo) if self.config.stream else None
        if not base:
            return None
        if base not in self._streams:
            with self._streams_lock:
                if base not in self._streams:
                    try:
                        self._streams[base] = self._new_market_stream(base, demo)
                    except ValueError as exc:      # a Config made in code, not checked by the command line
                        log.error("no live market data: %s", exc)
                        self._streams[base] = None
        return self._streams[base]

    def _new_market_stream(self, base, demo):
        def rest_book(inst_id):
            return self.client.call("GET", "/api/v5/market/books", {"instId": inst_id, "sz": OKX_MAX_DEPTH},
                                    demo=demo)[0]
        proxy = self._ws_proxy(base)
        log.info("live market data from %s%s", base, " through proxy %s" % proxy if proxy else "")
        return MarketStream(base, self.config.clock, self._ws_tls(base), proxy, self.config.stream_idle, rest_book)

    def _ws_tls(self, base):
        """The TLS context of a wss:// stream: REST's own (one for everything), made once."""
        if not base.startswith("wss:"):
            return None
        if self._tls is None:
            self._tls = self.client.pool.ssl_context or tls_context(self.config.ca_file)
        return self._tls

    def account_stream(self, credentials):
        """The key's live account stream, or None when it is off (--no-stream, --no-private-stream, or no
        WebSocket host for --api-base)."""
        base = self.ws_base(credentials.demo) if self.config.private_stream else None
        if not base:
            return None
        key = (credentials.api_key, credentials.demo)
        stream = self._accounts.get(key)
        if stream is None:
            with self._streams_lock:
                stream = self._accounts.get(key)
                if stream is None:
                    self._forget_idle_accounts()
                    try:
                        stream = self._new_account_stream(base, credentials)
                    except ValueError as exc:      # a Config made in code, not checked by the command line
                        log.error("no live account data: %s", exc)
                        self.config.private_stream = False
                        return None
                    self._accounts[key] = stream
        if (stream.credentials.secret, stream.credentials.passphrase) != (credentials.secret, credentials.passphrase):
            if stream.login_error is None:
                return None               # memory answers only the secret its connection logged in with
            stream.credentials = credentials      # the one it has was refused: the next login tries this one
        return stream

    def _new_account_stream(self, base, credentials):
        def load_open_orders():
            return paged(self.client, credentials, "/api/v5/trade/orders-pending", {},
                         deadline=self.config.clock.monotonic() + self.config.timeout)

        def sync_clock():
            self.client.sync_clock(self.config.clock.monotonic() + self.config.timeout)
        return AccountStream(base, self.config.clock, credentials, self.client.exchange_clock, load_open_orders,
                             sync_clock, self._ws_tls(base), self._ws_proxy(base), self.config.stream_idle)

    def _forget_idle_accounts(self):
        """Drop the account streams of keys not read for a long while (under the lock)."""
        if len(self._accounts) >= 64:
            for key, stream in list(self._accounts.items()):
                if stream.idle():
                    stream.close()
                    del self._accounts[key]

    def _ws_proxy(self, base):
        if self.config.proxy:
            return Proxy(self.config.proxy)
        return Proxy.from_environment(base.replace("wss://", "https://").replace("ws://", "http://"))

    def status(self):
        """This exchange's part of GET /status (no secret, passphrase or full key)."""
        streams = self.streams()
        return {"api_base": self.client.api_base,
                "streams": {"market": [stream.status() for stream in streams if isinstance(stream, MarketStream)],
                            "account": [stream.status() for stream in streams if isinstance(stream, AccountStream)]},
                "rate_limit_buckets": self.client.limiter.usage(),
                "okx_requests": dict(self.client.requests_sent),
                "okx_requests_by_method": self.client.requests_by_method()}

    def streams(self):
        """Every live stream: the market streams, then the account streams."""
        with self._streams_lock:
            return ([stream for stream in self._streams.values() if stream is not None]
                    + list(self._accounts.values()))

    def close(self):
        self.client.close()
        for stream in self.streams():
            stream.close()
        with self._streams_lock:
            self._streams, self._accounts = {}, {}


class OKX(BaseProtocol):
    """OKX v5: spot, perpetual swaps, delivery futures and options; orders, amendments and condition orders.

    One instance serves one docker request; everything shared (connections, clock, limits, caches, order
    memory, the live streams) lives in ``shared``, an OKXShared.
    """

    name = "OKX"

    def __init__(self, request, shared):
        super().__init__(request)
        self.shared = shared
        self.client = shared.client
        self.deadline = request.deadline or self.client.clock.monotonic() + self.client.config.timeout
        self._credentials = None
        self._demo = None

    # --- plumbing -------------------------------------------------------------------------------------
    _known_keys = LastUsed(1000)          # (access key, Secret Key field) -> Credentials: parsed once

    @property
    def credentials(self):
        """The request's OKX key; BadRequest when the docker sent none or a malformed one."""
        if self._credentials is None:
            field = (self.request.access_key, self.request.secret_key)
            self._credentials = OKX._known_keys.get(field)
            if self._credentials is None:
                self._credentials = OKX._known_keys[field] = self._parse_credentials()
        return self._credentials

    def _parse_credentials(self):
        access_key = self.request.access_key
        if not access_key:
            raise BadRequest("access_key is empty: this method needs an OKX API key")
        if not _PRINTABLE_RE.match(access_key):
            raise BadRequest("access_key may hold only printable ASCII characters")
        if len(access_key) > MAX_KEY_CHARS:
            raise BadRequest("access_key is longer than any OKX API key (%d characters at most)" % MAX_KEY_CHARS)
        secret, passphrase, demo = parse_secret_field(self.request.secret_key)
        return Credentials(access_key, secret, passphrase, demo)

    @property
    def demo(self):
        """True for a demo-trading key (``,simulate``): its market-data calls carry the demo header too."""
        if self._demo is None:
            try:
                self._demo = self.credentials.demo
            except BadRequest:        # public calls need no valid key
                try:
                    self._demo = parse_secret_field(self.request.secret_key)[2]
                except BadRequest:
                    self._demo = False
        return self._demo

    def _market(self, path, params):
        """An unsigned market-data call (shared with robots asking the same at the same time)."""
        return self.client.shared_call(path, params, deadline=self.deadline, demo=self.demo)

    def _account_stream(self):
        """The key's live account stream, or None: then every read of the account goes to REST."""
        return self.shared.account_stream(self.credentials)

    def _private(self, method, path, params=None, body=None, **options):
        return self.client.call(method, path, params=params, body=body, credentials=self.credentials,
                                deadline=self.deadline, **options)

    def _first(self, rows, what):
        if not rows or not isinstance(rows[0], dict):
            raise ProtocolError("OKX answered no %s" % what)
        return rows[0]

    def inst_id(self, symbol):
        """The OKX instId of a parsed FMZ symbol; delivery futures are found by their alias."""
        pair = "%s-%s" % (symbol.base, symbol.quote)
        contract = symbol.contract
        if not contract:
            return pair
        if contract == "swap":
            return pair + "-SWAP"
        if re.match(r"^\d{6}$", contract):
            return "%s-%s" % (pair, contract)
        if _OPTION_RE.match(contract):
            inst_id = contract
            if not inst_id.startswith(pair + "-"):
                raise BadRequest("option %s is not one of %s's: use %s.%s-YYMMDD-STRIKE-C"
                                 % (inst_id, symbol.fmz.partition(".")[0], symbol.fmz.partition(".")[0], pair))
            return inst_id
        if contract in FUTURES_ALIASES:
            for _ in range(2):     # once more after re-reading a list in which the contract expired
                now, expired = self.client.exchange_clock.now_ms(), False
                for inst_id, row in self.client.instruments("FUTURES", self.deadline).items():
                    if row.get("alias") == contract and (row.get("instFamily") or row.get("uly")) == pair:
                        if _ms(row.get("expTime")) > now or not row.get("expTime"):
                            return inst_id
                        expired = True
                if not expired:
                    break
                # The contract of that alias expired since the list was read: read the list again.
                self.client.forget("instruments", ("FUTURES", None))
            raise BadRequest("OKX lists no %s futures contract for %s" % (contract, symbol.fmz))
        raise BadRequest("unknown contract type %r: use swap, %s, a delivery date YYMMDD, or an option's "
                         "instId" % (contract, ", ".join(FUTURES_ALIASES)))

    def fmz_symbol(self, inst_id):
        """FMZ symbol of an instId; delivery futures by their alias when the instrument list has it."""
        alias = ""
        if inst_type_of(inst_id) == "FUTURES":
            alias = self.client.instruments("FUTURES", self.deadline).get(inst_id, {}).get("alias", "")
        return fmz_symbol_of(inst_id, alias)

    # --- market data ----------------------------------------------------------------------------------
    @staticmethod
    def _ticker_data(fmz_symbol, row):
        return {"symbol": fmz_symbol, "buy": row.get("bidPx", ""), "sell": row.get("askPx", ""),
                "high": row.get("high24h", ""), "low": row.get("low24h", ""), "open": row.get("open24h", ""),
                "last": row.get("last", ""), "vol": row.get("vol24h", ""), "time": _ms(row.get("ts"))}

    def ticker(self, symbol):
        """ticker -> GET /api/v5/market/ticker (or the live ``tickers`` stream)."""
        inst_id = self.inst_id(symbol)
        stream = self.shared.market_stream(self.demo)
        row = stream.ticker(inst_id) if stream else None
        if row is None:
            row = self._first(self._market("/api/v5/market/ticker", {"instId": inst_id}), "ticker")
        return self._ticker_data(symbol.fmz, row), row

    def depth(self, symbol, limit):
        """depth -> GET /api/v5/market/books?sz=limit (or the live ``books5``/``books`` stream)."""
        inst_id = self.inst_id(symbol)
        limit = min(limit, OKX_MAX_DEPTH)
        stream = self.shared.market_stream(self.demo)
        book = stream.depth(inst_id, limit) if stream else None
        if book is None:
            book = self._first(self._market("/api/v5/market/books", {"instId": inst_id, "sz": limit}), "order book")
        data = {"time": _ms(book.get("ts")),
                "asks": [[level[0], level[1]] for level in book.get("asks", [])[:limit]],
                "bids": [[level[0], level[1]] for level in book.get("bids", [])[:limit]]}
        return data, book

    def trades(self, symbol, limit):
        """trades -> GET /api/v5/market/trades (or the live ``trades`` stream)."""
        inst_id = self.inst_id(symbol)
        stream = self.shared.market_stream(self.demo)
        rows = stream.trades(inst_id, limit) if stream else None
        if rows is None:
            rows = self._market("/api/v5/market/trades", {"instId": inst_id, "limit": limit})
            if stream:
                stream.seed_trades(inst_id, rows)
        data = [{"id": row.get("tradeId", ""), "time": _ms(row.get("ts")), "price": row.get("px", ""),
                 "amount": row.get("sz", ""), "type": row.get("side", "")} for row in rows[:limit]]
        return data, rows

    def records(self, symbol, period, limit):
        """records -> GET /api/v5/market/candles, then /market/history-candles ``after`` the oldest bar
        until ``limit`` bars are found (OKX gives at most 300 and 100 a call)."""
        inst_id, bar = self.inst_id(symbol), okx_bar(period)
        bars = {}
        rows = self._market("/api/v5/market/candles",
                            {"instId": inst_id, "bar": bar, "limit": min(limit, OKX_CANDLES_PAGE)})
        while True:
            fresh = 0
            for row in rows:
                if isinstance(row, list) and len(row) >= 6 and row[0] not in bars:
                    bars[row[0]] = row
                    fresh += 1
            if len(bars) >= limit or not fresh:
                break
            oldest = min(bars, key=int)
            rows = self._market("/api/v5/market/history-candles",
                                {"instId": inst_id, "bar": bar, "after": oldest,
                                 "limit": min(limit - len(bars), OKX_HISTORY_CANDLES_PAGE)})
        ordered = sorted(bars.values(), key=lambda row: int(row[0]))[-limit:]
        data = [[int(row[0]) // 1000, row[1], row[2], row[3], row[4], row[5]] for row in ordered]
        return data, None

    def _inst_type(self, contract):
        if not contract:
            return "SPOT"
        if contract == "swap":
            return "SWAP"
        if contract in FUTURES_ALIASES or contract == "futures":
            return "FUTURES"
        if contract == "option" or _OPTION_RE.match(contract):
            return "OPTION"
        raise BadRequest("unknown contract type %r: use spot, swap, futures or option" % contract)

    @staticmethod
    def _option_family(family):
        """OKX lists options per underlying (instFamily, e.g. BTC-USD): the pair of the request's symbol."""
        if not family:
            raise BadRequest("options are listed per underlying: give the pair too, e.g. symbol BTC_USD with "
                             "contract type option (or symbol BTC_USD.option)")
        return family

    def tickers(self, contract, family=None):
        """tickers -> GET /api/v5/market/tickers?instType=SPOT (SWAP/FUTURES/OPTION with a contract type;
        options of the symbol's pair, instFamily)."""
        params = {"instType": self._inst_type(contract)}
        if params["instType"] == "OPTION":
            params["instFamily"] = self._option_family(family)
        rows = self._market("/api/v5/market/tickers", params)
        data = [self._ticker_data(self.fmz_symbol(row["instId"]), row) for row in rows if "instId" in row]
        if contract in FUTURES_ALIASES:
            data = [ticker for ticker in data if ticker["symbol"].endswith("." + contract)]
        return data, None

    def markets(self, contract, family=None):
        """markets -> GET /api/v5/public/instruments (cached), keyed by FMZ symbol; options of the symbol's
        pair (instFamily)."""
        inst_type = self._inst_type(contract)
        family = self._option_family(family) if inst_type == "OPTION" else None
        data = {}
        for inst_id, row in self.client.instruments(inst_type, self.deadline, family).items():
            fmz_symbol = fmz_symbol_of(inst_id, row.get("alias", ""))
            if contract in FUTURES_ALIASES and row.get("alias") != contract:
                continue
            if inst_type == "SPOT":
                base, quote = row.get("baseCcy", ""), row.get("quoteCcy", "")
                ct_val, ct_val_ccy, max_notional = "1", base, row.get("maxMktSz", "")
            else:
                base, _, quote = (row.get("instFamily") or row.get("uly") or "-").partition("-")
                ct_val, ct_val_ccy = row.get("ctVal", ""), row.get("ctValCcy", "")
                max_notional = row.get("maxMktAmt", "")
            data[fmz_symbol] = {
                "symbol": fmz_symbol, "baseAsset": base, "quoteAsset": quote,
                "tickSize": row.get("tickSz", ""), "amountSize": row.get("lotSz", ""),
                "pricePrecision": _precision(row.get("tickSz")), "amountPrecision": _precision(row.get("lotSz")),
                "minQty": row.get("minSz", ""), "maxQty": row.get("maxLmtSz", ""),
                "minNotional": "0", "maxNotional": _zero_if_empty(max_notional),
                "ctVal": ct_val, "ctValCcy": ct_val_ccy,
            }
        return data, None

    # --- account --------------------------------------------------------------------------------------
    def accounts(self):
        """accounts -> GET /api/v5/account/balance (or the live ``account`` channel): free = availBal,
        frozen = frozenBal."""
        stream = self._account_stream()
        rows, raw = (stream and stream.balance()) or (None, None)
        if rows is None:
            rows = raw = self._private("GET", "/api/v5/account/balance")
        details = self._first(rows, "balance").get("details", [])
        data = [{"currency": row.get("ccy", ""), "free": _zero_if_empty(row.get("availBal")),
                 "frozen": _zero_if_empty(row.get("frozenBal"))} for row in details]
        return data, raw

    def assets(self):
        """assets -> the same as accounts."""
        return self.accounts()

    # --- orders ---------------------------------------------------------------------------------------
    def trade(self, symbol, type, price, amount, direction=None, leverage=None):
        """trade -> POST /api/v5/trade/order, placed at most once (OrderPlacer): a clOrdId from the nonce,
        OKX's expTime, and a lost answer found again by clOrdId.

        Spot: tdMode cash; price "-1" is a market order whose buy amount is in the quote currency.
        Futures: amount in contracts; tdMode from --margin-mode; buy/sell open, closebuy/closesell close
        (posSide in long/short mode, reduceOnly in net mode). A leverage param first sets the contract's
        leverage (only when it differs from the last one set).
        """
        inst_id = self.inst_id(symbol)
        direction = self._order_direction(symbol, type, direction)
        clord_id = clord_id_for(self.request.nonce)
        if symbol.contract and leverage is not None and inst_type_of(inst_id) != "OPTION":   # options: none
            if self.shared.leverage.get(self._leverage_key(inst_id)) != Decimal(leverage):  # not every order
                self.set_margin_level(symbol, leverage)
        placed = self._place(PLAIN_ORDER, symbol, inst_id,
                             lambda: self._order_body(symbol, inst_id, clord_id, direction, price, amount))
        stream = self._account_stream()
        if stream:
            stream.wrote(inst_id, placed.exchange_id)      # read your writes
        return {"id": "%s,%s" % (inst_id, placed.exchange_id)}, placed.raw

    def _place(self, kind, symbol, inst_id, build_body):
        """Place the order ``build_body()`` describes, at most once. A contract order that OKX refused for
        its posSide (nothing was placed: the account's position mode changed since it was read) is built
        and placed once more with the mode read again."""
        try:
            return self.shared.orders.place(kind, self.credentials, inst_id, build_body(), self.deadline)
        except ExchangeError as exc:
            if not (symbol.contract and exc.code in ("51000", "50014") and "posSide" in exc.message):
                raise
            self.client.forget("account", (self.credentials.api_key, self.credentials.demo))
            try:
                body = build_body()
            except ProtocolError:
                raise exc from None     # OKX's own reason, not why reading the mode failed
            return self.shared.orders.place(kind, self.credentials, inst_id, body, self.deadline)

    def _order_body(self, symbol, inst_id, clord_id, direction, price, amount):
        """The /trade/order body: spot in cash mode; contracts with tdMode and posSide or reduceOnly."""
        side, pos_side, reduce_only = direction
        body = {"instId": inst_id, "clOrdId": clord_id, "side": side, "sz": amount}
        if price == "-1":
            body["ordType"] = "market"
        else:
            body.update(ordType="limit", px=price)
        self._add_mode(body, symbol, inst_id, pos_side, reduce_only)
        if not symbol.contract and body["ordType"] == "market":
            body["tgtCcy"] = "quote_ccy" if side == "buy" else "base_ccy"
        return body

    def _add_mode(self, body, symbol, inst_id, pos_side, reduce_only):
        """tdMode, and posSide (long/short mode) or reduceOnly (net mode) of a swap or futures order; options
        are always net and close by the opposite side."""
        if not symbol.contract:
            body["tdMode"] = "cash"
            return
        body["tdMode"] = self.client.config.margin_mode
        if inst_type_of(inst_id) == "OPTION":
            return
        if self._hedge_mode():
            body["posSide"] = pos_side
        elif reduce_only:
            body["reduceOnly"] = True

    def _order_direction(self, symbol, type, direction):
        """(side, posSide, reduceOnly) of an order type: buy, sell, closebuy, closesell."""
        kind = type.lower()
        if direction and not symbol.contract and direction.lower() not in ("buy", "sell"):
            raise BadRequest("direction %s applies to swaps and futures, not to spot %s" % (direction, symbol.fmz))
        if direction and kind in ("closebuy", "closesell") and direction.lower() != kind:
            raise BadRequest("direction %s contradicts type %s" % (direction.lower(), kind))
        if direction and kind in ("buy", "sell"):
            wanted = direction.lower()
            if wanted in ("closebuy", "closesell"):
                if (wanted == "closebuy") != (kind == "sell"):
                    raise BadRequest("direction %s closes with %s, not %s"
                                     % (wanted, "sell" if wanted == "closebuy" else "buy", kind))
                kind = wanted
            elif wanted not in ("buy", "sell"):
                raise BadRequest("direction must be buy, sell, closebuy or closesell, got %r" % direction)
            elif wanted != kind:
                raise BadRequest("direction %s contradicts type %s" % (wanted, kind))
        table = {"buy": ("buy", "long", False), "sell": ("sell", "short", False),
                 "closebuy": ("sell", "long", True), "closesell": ("buy", "short", True)}
        if kind not in table or (not symbol.contract and kind not in ("buy", "sell")):
            allowed = "buy, sell, closebuy or closesell" if symbol.contract else "buy or sell"
            raise BadRequest("type must be %s, got %r" % (allowed, type))
        return table[kind]

    def _hedge_mode(self):
        """True when the account keeps long and short positions apart (posMode long_short_mode)."""
        config = self.client.account_config(self.credentials, self.deadline)
        return config.get("posMode") == "long_short_mode"

    def _order_data(self, row):
        inst_id = row.get("instId", "")
        data = {
            "id": "%s,%s" % (inst_id, row.get("ordId", "")),
            "symbol": self.fmz_symbol(inst_id),
            "amount": row.get("sz", ""),
            "price": _zero_if_empty(row.get("px")),
            "deal_amount": _zero_if_empty(row.get("accFillSz")),
            "avg_price": _zero_if_empty(row.get("avgPx")),
            "type": row.get("side", ""),
            "status": fmz_order_status(row.get("state"), row.get("accFillSz")),
        }
        if inst_type_of(inst_id) != "SPOT":
            closing = row.get("reduceOnly") == "true" or (row.get("posSide"), row.get("side")) in (
                ("long", "sell"), ("short", "buy"))
            data["offset"] = "close" if closing else "open"
        return data

    def _split_order_id(self, order_id, symbol):
        """(instId, ordId) of a docker order id ``INSTID,ORDID`` (or a bare ordId and the symbol)."""
        inst_id, sep, ord_id = order_id.partition(",")
        if not sep:
            if symbol is None:
                raise BadRequest("order id %r is not 'INSTID,ORDID' and no symbol was given" % order_id)
            inst_id, ord_id = self.inst_id(symbol), order_id
        if not inst_id or not ord_id:
            raise BadRequest("order id %r is not 'INSTID,ORDID'" % order_id)
        return inst_id.strip().upper(), ord_id.strip()

    def _paged(self, path, params, limit=None, after=None):
        return paged(self.client, self.credentials, path, params, limit, after, self.deadline)

    def orders(self, symbol):
        """orders -> GET /api/v5/trade/orders-pending, every page (or the live ``orders`` channel)."""
        params, inst_id = {}, None
        if symbol is not None:
            inst_id = self.inst_id(symbol)
            params = {"instType": inst_type_of(inst_id), "instId": inst_id}
        stream = self._account_stream()
        rows, raw = (stream and stream.open_orders(inst_id)) or (None, None)
        if rows is None:
            rows = raw = self._paged("/api/v5/trade/orders-pending", params)
        return [self._order_data(row) for row in rows], raw

    def order(self, id, symbol):
        """order -> GET /api/v5/trade/order?instId&ordId (or the live ``orders`` channel)."""
        inst_id, ord_id = self._split_order_id(id, symbol)
        stream = self._account_stream()
        row, raw = (stream and stream.order(inst_id, ord_id)) or (None, None)
        if row is None:
            row = raw = self._first(self._private("GET", "/api/v5/trade/order",
                                                  {"instId": inst_id, "ordId": ord_id}), "order")
        return self._order_data(row), raw

    def historyorders(self, symbol, since, limit):
        """historyorders -> GET /api/v5/trade/orders-history (7 days), then /orders-history-archive
        (3 months) when more is wanted or ``since`` is older; newest first."""
        limit = limit or DEFAULT_HISTORY_ORDERS
        if symbol is not None:
            inst_id = self.inst_id(symbol)
            queries = [{"instType": inst_type_of(inst_id), "instId": inst_id}]
        else:
            queries = [{"instType": inst_type} for inst_type in ("SPOT", "SWAP", "FUTURES", "OPTION")]
        week_ago = self.client.exchange_clock.now_ms() - HISTORY_DAYS * 86400000
        rows = []
        for params in queries:
            if since:
                params["begin"] = since
            found = self._paged("/api/v5/trade/orders-history", params, limit)
            if len(found) < limit and (not since or since < week_ago):
                seen = set(row.get("ordId") for row in found)
                # The archive holds the last 7 days too: go on from the oldest order already found.
                archive = self._paged("/api/v5/trade/orders-history-archive", params, limit - len(found),
                                      after=found[-1].get("ordId") if found else None)
                found.extend(row for row in archive if row.get("ordId") not in seen)
            rows.extend(found)
        rows.sort(key=lambda row: _ms(row.get("cTime")), reverse=True)
        rows = rows[:limit]
        return [self._order_data(row) for row in rows], rows

    def cancel(self, id, symbol):
        """cancel -> POST /api/v5/trade/cancel-order."""
        inst_id, ord_id = self._split_order_id(id, symbol)
        rows = self._private("POST", "/api/v5/trade/cancel-order", body={"instId": inst_id, "ordId": ord_id})
        stream = self._account_stream()
        if stream:
            stream.wrote(inst_id, ord_id, cancel=True)
        log.info("canceled order %s,%s", inst_id, ord_id)
        return True, rows

    def modifyorder(self, id, symbol, price, amount, type=None):
        """modifyorder -> POST /api/v5/trade/amend-order (``newPx``, ``newSz``; "-1" keeps either; OKX's newSz
        counts what already filled), then the outcome: OKX's "accepted" is not yet success. The live
        ``orders`` channel brings it (amendResult of our reqId); without it the order is read back."""
        inst_id, ord_id = self._split_order_id(id, symbol)
        body = {"instId": inst_id, "ordId": ord_id, "reqId": clord_id_for(self.request.nonce)}
        if price != "-1":
            body["newPx"] = price
        if amount != "-1":
            body["newSz"] = amount
        if len(body) == 3:
            raise BadRequest("modifyorder changes nothing: price and amount are both -1 (keep)")
        stream = self._account_stream()
        waiter = stream.expect_amend(body["reqId"]) if stream else None
        mark = stream.mark() if stream else None
        clock = self.client.clock
        post_deadline, until = self.shared.orders.window(self.deadline)          # until: OKX's expTime
        try:
            status, envelope = self.client.request("POST", "/api/v5/trade/amend-order", body=body,
                                                   credentials=self.credentials, deadline=post_deadline,
                                                   exp_time=until)
            raise_for_code(envelope, status, "/api/v5/trade/amend-order")
        except (TransportError, ExchangeError) as exc:
            if not (getattr(exc, "maybe_sent", False) or getattr(exc, "outcome_unknown", False)):
                raise
            envelope = None                 # lost answer: once its expTime passed, the order shows the outcome
            log.warning("amending %s,%s gave no clear answer (%s): reading the order", inst_id, ord_id, exc)
            wait = until + ORDER_EXPIRY_MARGIN - clock.monotonic()
            if 0 < wait < self.deadline - clock.monotonic() - 0.05:
                clock.sleep(wait)
        result = stream.amend_result(waiter) if waiter else None
        if result is not None and result[0] not in ("0", "2"):
            raise ExchangeError(result[1] or "1", "%s (OKX accepted the amendment of %s,%s, then it failed: "
                                "amendResult %s)" % (result[2] or "amendment failed", inst_id, ord_id, result[0]))
        if result is None:
            self._check_amended(inst_id, ord_id, body, envelope is None)
            if stream:
                stream.wrote(inst_id, ord_id, since=mark)       # read your writes: memory waits for its push
        log.info("amended order %s,%s:%s%s", inst_id, ord_id, " price %s" % price if price != "-1" else "",
                 " amount %s" % amount if amount != "-1" else "")
        return {"id": "%s,%s" % (inst_id, ord_id)}, envelope

    def _check_amended(self, inst_id, ord_id, body, answer_lost):
        """Read the order back until it shows the amendment (a few tries: OKX applies it asynchronously);
        an error when it does not."""
        for attempt in range(AMEND_READ_BACKS):
            row = self._first(self._private("GET", "/api/v5/trade/order", {"instId": inst_id, "ordId": ord_id}),
                              "order")
            price_done = "newPx" not in body or Decimal(row.get("px") or 0) == Decimal(body["newPx"])
            size_done = "newSz" not in body or Decimal(row.get("sz") or 0) == Decimal(body["newSz"]) or (
                row.get("state") == "filled" and Decimal(body["newSz"]) <= _filled(row))
            if price_done and size_done:
                return
            if STATE_RANK.get(row.get("state"), 0) == 2:
                break                       # it ended (filled or canceled) before the amendment
            self.client.clock.sleep(AMEND_READ_BACK_WAIT)
        if answer_lost:
            raise TransportError("the amendment's answer was lost, and order %s,%s shows price %s, amount %s, "
                                 "state %s after its expTime: not amended"
                                 % (inst_id, ord_id, row.get("px") or "market", row.get("sz"), row.get("state")))
        raise TransportError("OKX accepted the amendment, but order %s,%s still shows price %s, amount %s, state "
                             "%s: it was not applied, or not yet; read the order before acting on it"
                             % (inst_id, ord_id, row.get("px") or "market", row.get("sz"), row.get("state")))

    # --- futures --------------------------------------------------------------------------------------
    def positions(self, symbol):
        """positions -> GET /api/v5/account/positions (or the live ``positions`` channel): swaps, futures and
        options, one symbol when given."""
        params = {}
        if symbol is not None:
            if not symbol.contract:
                raise BadRequest("positions exist for swaps and futures, not for spot %s" % symbol.fmz)
            params["instId"] = self.inst_id(symbol)
        stream = self._account_stream()
        rows, raw = (stream and stream.positions(params.get("instId"))) or (None, None)
        if rows is None:
            rows = raw = self._private("GET", "/api/v5/account/positions", params)
        data = []
        for row in rows:
            inst_id = row.get("instId", "")
            if inst_type_of(inst_id) == "SPOT" or row.get("pos") in ("", None) or Decimal(row["pos"]) == 0:
                continue
            pos = Decimal(row["pos"])
            is_short = row.get("posSide") == "short" or (row.get("posSide") == "net" and pos < 0)
            amount = format(abs(pos), "f")
            available = row.get("availPos")
            frozen = format(abs(pos) - Decimal(available), "f") if available not in ("", None) else "0"
            fmz_symbol = self.fmz_symbol(inst_id)
            data.append({
                "symbol": fmz_symbol, "margin_level": _zero_if_empty(row.get("lever")), "amount": amount,
                "frozen_amount": frozen, "price": _zero_if_empty(row.get("avgPx")),
                "profit": _zero_if_empty(row.get("upl")),
                "margin": _zero_if_empty(row.get("margin") or row.get("imr")),
                "type": 1 if is_short else 0, "contract_type": fmz_symbol.partition(".")[2],
            })
        return data, raw

    def set_margin_level(self, symbol, margin_level):
        """SetMarginLevel -> POST /api/v5/account/set-leverage for the contract and --margin-mode
        (isolated margin in long/short mode: once for each side)."""
        inst_id = self.inst_id(symbol)
        if not symbol.contract or inst_type_of(inst_id) == "OPTION":
            raise BadRequest("leverage applies to swaps and futures, not to %s %s"
                             % ("spot" if not symbol.contract else "the option", symbol.fmz))
        mgn_mode = self.client.config.margin_mode
        body = {"instId": inst_id, "lever": str(margin_level), "mgnMode": mgn_mode}
        if mgn_mode == "isolated" and self._hedge_mode():
            rows = [self._private("POST", "/api/v5/account/set-leverage", body=dict(body, posSide=side))
                    for side in ("long", "short")]
        else:
            rows = self._private("POST", "/api/v5/account/set-leverage", body=body)
        self.shared.leverage[self._leverage_key(inst_id)] = Decimal(str(margin_level))
        return True, rows

    def _leverage_key(self, inst_id):
        """What one leverage setting covers: in cross margin every contract of an underlying and type
        (OKX applies it to all of them), in isolated margin one contract."""
        mgn_mode = self.client.config.margin_mode
        scope = inst_id if mgn_mode == "isolated" else (inst_id.rsplit("-", 1)[0], inst_type_of(inst_id))
        return self.credentials.api_key, self.credentials.demo, mgn_mode, scope

    def fundings(self, symbol):
        """fundings -> GET /api/v5/public/funding-rate (one swap, or every swap: instId ANY)."""
        inst_id = self.inst_id(symbol) if symbol is not None else "ANY"
        if symbol is not None and inst_type_of(inst_id) != "SWAP":
            raise BadRequest("funding rates exist for perpetual swaps only, not for %s" % symbol.fmz)
        rows = self._market("/api/v5/public/funding-rate", {"instId": inst_id})
        data = [{"symbol": fmz_symbol_of(row.get("instId", "")), "rate": row.get("fundingRate", ""),
                 "time": _ms(row.get("fundingTime")), "next_time": _ms(row.get("nextFundingTime")),
                 "interval": _ms(row.get("nextFundingTime")) - _ms(row.get("fundingTime"))} for row in rows]
        return data, rows

    # --- condition orders (OKX's algo orders) ----------------------------------------------------------
    def createconditionorder(self, symbol, type, amount, condition, direction=None):
        """createconditionorder -> POST /api/v5/trade/order-algo, placed at most once (OrderPlacer, by an
        algoClOrdId from the nonce): OCO -> ordType oco, take-profit or stop-loss -> conditional with that
        leg only, generic -> trigger. Only the legs that are set are sent; an order price of -1 is a market
        order. Spot amounts are in the base currency; contracts' in contracts."""
        inst_id = self.inst_id(symbol)
        side, pos_side, reduce_only = self._order_direction(symbol, type, direction)
        algo_client_id = algo_client_id_for(self.request.nonce, condition)

        def build_body():
            body = {"instId": inst_id, "algoClOrdId": algo_client_id, "side": side, "sz": amount,
                    "ordType": CONDITION_TYPES[condition.type]}
            body.update(algo_legs(condition))
            self._add_mode(body, symbol, inst_id, pos_side, reduce_only)
            if (not symbol.contract and side == "buy" and condition.type != 3
                    and "-1" in (condition.tp_order, condition.sl_order)):
                body["tgtCcy"] = "base_ccy"     # OKX's default for a market buy would be the quote currency
                                                # (trigger orders take no tgtCcy: OKX 51281)
            return body
        placed = self._place(ALGO_ORDER, symbol, inst_id, build_body)
        return {"id": "%s,%s" % (inst_id, placed.exchange_id)}, placed.raw

    def modifyconditionorder(self, id, symbol, amount, condition, type=None):
        """modifyconditionorder -> POST /api/v5/trade/amend-algos: ``newSz`` unless amount is -1, and the
        legs the condition sets (never a 0 leg: OKX deletes a leg amended to 0)."""
        inst_id, algo_id = self._split_order_id(id, symbol)
        body = {"instId": inst_id, "algoId": algo_id}
        if amount != "-1":
            body["newSz"] = amount
        if condition is not None:
            current = self._algo_order(algo_id)
            kind = int(self._condition_data(current)["condition"]["ConditionType"])
            if condition.type != kind:
                raise BadRequest("condition order %s is a%s %s condition (ConditionType %d): an amendment "
                                 "cannot make it a%s %s one" % (id, "n" if kind == 0 else "", CONDITION_NAMES[kind],
                                                                kind, "n" if condition.type == 0 else "",
                                                                CONDITION_NAMES[condition.type]))
            if kind in (1, 2) and set(condition.legs) - {"tp" if kind == 1 else "sl"}:
                raise BadRequest("condition order %s is a %s condition: its amendment sets that leg only"
                                 % (id, CONDITION_NAMES[kind]))
            if current.get("ordType") == "trigger":
                if len(condition.legs) != 1:
                    raise BadRequest("condition order %s is generic (one trigger): its condition sets one leg, "
                                     "got %d" % (id, len(condition.legs)))
                (trigger, order), = condition.legs.values()
                body.update(newTriggerPx=trigger, newOrdPx=order)
            else:
                body.update(("new" + name[0].upper() + name[1:], value)
                            for name, value in algo_legs(condition).items())
        if len(body) == 2:
            raise BadRequest("modifyconditionorder changes nothing: amount is -1 (keep) and no condition is set")
        rows = self._private("POST", "/api/v5/trade/amend-algos", body=body)
        log.info("amended condition order %s,%s", inst_id, algo_id)
        return {"id": "%s,%s" % (inst_id, algo_id)}, rows

    def cancelconditionorder(self, id, symbol):
        """cancelconditionorder -> POST /api/v5/trade/cancel-algos (its body is an array)."""
        inst_id, algo_id = self._split_order_id(id, symbol)
        rows = self._private("POST", "/api/v5/trade/cancel-algos", body=[{"instId": inst_id, "algoId": algo_id}])
        log.info("canceled condition order %s,%s", inst_id, algo_id)
        return True, rows

    def conditionorder(self, id, symbol):
        """conditionorder -> GET /api/v5/trade/order-algo?algoId."""
        inst_id, algo_id = self._split_order_id(id, symbol)
        row = self._algo_order(algo_id)
        if row.get("instId") != inst_id:
            raise ExchangeError("51603", "Order does not exist.")
        return self._condition_data(row), row

    def conditionorders(self, symbol):
        """conditionorders -> GET /api/v5/trade/orders-algo-pending, ordType conditional,oco then trigger,
        every page; newest first."""
        rows = []
        for ord_type in ALGO_ORD_TYPES:
            rows.extend(paged(self.client, self.credentials, "/api/v5/trade/orders-algo-pending",
                              dict(self._algo_filter(symbol), ordType=ord_type), deadline=self.deadline,
                              cursor="algoId"))
        rows.sort(key=lambda row: (_ms(row.get("cTime")), _ms(row.get("algoId"))), reverse=True)
        return [self._condition_data(row) for row in rows], rows

    def historyconditionorders(self, symbol, since, limit):
        """historyconditionorders -> GET /api/v5/trade/orders-algo-history for each ordType and final state
        (effective, canceled, order_failed), paged back until ``since`` (cTime, ms) is passed; the ``limit``
        oldest from ``since`` on, or the ``limit`` newest without it, oldest first."""
        limit = limit or DEFAULT_HISTORY_ORDERS
        rows = []
        for ord_type in ALGO_ORD_TYPES:
            for state in ALGO_FINAL_STATES:
                params = dict(self._algo_filter(symbol), ordType=ord_type, state=state)
                after, found = None, 0
                while True:
                    page = self._private("GET", "/api/v5/trade/orders-algo-history",
                                         dict(params, limit=OKX_ORDERS_PAGE, **({"after": after} if after else {})))
                    kept = [row for row in page if _ms(row.get("cTime")) >= since]
                    rows.extend(kept)
                    found += len(kept)
                    if (len(page) < OKX_ORDERS_PAGE or not since and found >= limit
                            or _ms(page[-1].get("cTime")) < since):
                        break             # this list is read far enough: newest first, `limit` of its own
                    after = page[-1].get("algoId")
        rows.sort(key=lambda row: (_ms(row.get("cTime")), row.get("algoId", "")))
        rows = rows[:limit] if since else rows[-limit:]
        return [self._condition_data(row) for row in rows], rows

    def _algo_order(self, algo_id):
        return self._first(self._private("GET", "/api/v5/trade/order-algo", {"algoId": algo_id}), "condition order")

    def _algo_filter(self, symbol):
        """The algo lists' filter for a symbol: OKX's algo lists take no instType OPTION, the instId alone."""
        if symbol is None:
            return {}
        inst_id = self.inst_id(symbol)
        if inst_type_of(inst_id) == "OPTION":
            return {"instId": inst_id}
        return {"instType": inst_type_of(inst_id), "instId": inst_id}

    def _condition_data(self, row):
        """A condition order in the order shape, plus ``condition``: FMZ's five fields, numbers as text."""
        inst_id, ord_type = row.get("instId", ""), row.get("ordType", "")
        tp = (row.get("tpTriggerPx") or "", row.get("tpOrdPx") or "")
        sl = (row.get("slTriggerPx") or "", row.get("slOrdPx") or "")
        if ord_type == "trigger":
            # A generic condition's one leg: the plugin marks a stop-loss leg in its algoClOrdId.
            leg = (row.get("triggerPx") or "", row.get("ordPx") or row.get("orderPx") or "")
            on_sl = str(row.get("algoClOrdId", "")).startswith(ALGO_SL_PREFIX)
            tp, sl, kind = (("", ""), leg, 3) if on_sl else (leg, ("", ""), 3)
        elif ord_type == "oco":
            kind = 0
        else:
            kind = 2 if sl[0] else 1
        fired = row.get("actualSide")
        leg = {"tp": tp, "sl": sl}.get(fired) or (tp if kind == 1 or kind == 3 and tp[0] else sl)
        status = ALGO_STATUS.get(row.get("state"), row.get("state") or "unknown")
        data = {
            "id": "%s,%s" % (inst_id, row.get("algoId", "")),
            "symbol": self.fmz_symbol(inst_id),
            "amount": row.get("sz", ""),
            "price": _zero_if_empty(leg[1]),
            "deal_amount": _zero_if_empty(row.get("actualSz")),
            "avg_price": _zero_if_empty(row.get("actualPx")),
            "type": row.get("side", ""),
            "status": status,
            "condition": {"ConditionType": str(kind), "TpTriggerPrice": _zero_if_empty(tp[0]),
                          "TpOrderPrice": _zero_if_empty(tp[1]), "SlTriggerPrice": _zero_if_empty(sl[0]),
                          "SlOrderPrice": _zero_if_empty(sl[1])},
        }
        if inst_type_of(inst_id) != "SPOT":
            closing = row.get("reduceOnly") in ("true", True) or (row.get("posSide"), row.get("side")) in (
                ("long", "sell"), ("short", "buy"))
            data["offset"] = "close" if closing else "open"
        return data

    # --- the older io form -----------------------------------------------------------------------------
    def io(self, code, args, symbol=None):
        """io: FMZ's older way to send futures settings (an operation code and its arguments): 0
        SetMarginLevel(args[0]), 1 SetDirection(args[0]) (true: the direction goes with each trade), 2
        SetContractType(args[0]) -> ``{"InstrumentID": instId}``, 3 GetPosition -> as positions."""
        def first_arg():
            if not args:
                raise BadRequest("io code %d needs args[0]" % code)
            return args[0]
        if code == 0:
            if symbol is None:
                raise BadRequest("io code 0 (SetMarginLevel) needs params.symbol")
            return self.set_margin_level(symbol, decimal_text(first_arg(), "args[0]"))
        if code == 1:
            if str(first_arg()).lower() not in ("buy", "sell", "closebuy", "closesell"):
                raise BadRequest("io code 1 (SetDirection): args[0] must be buy, sell, closebuy or closesell")
            return True, None
        if code == 2:
            if symbol is None:
                raise BadRequest("io code 2 (SetContractType) needs params.symbol, the pair")
            contract = first_arg()
            if not isinstance(contract, str):
                raise BadRequest("io code 2 (SetContractType): args[0] must be a contract type such as swap")
            return {"InstrumentID": self.inst_id(Symbol(*split_symbol(symbol.fmz.partition(".")[0], contract)))}, None
        if code == 3:
            return self.positions(symbol)
        raise BadRequest("io code %d is not known: 0 SetMarginLevel, 1 SetDirection, 2 SetContractType, "
                         "3 GetPosition" % code)

    # --- exchange.IO("api", verb, path, query) --------------------------------------------------------
    def api(self, path, params):
        """``__api_<path>`` -> that OKX path, signed when the request has a key; OKX's JSON as ``data``.

        The verb comes from the docker's ``Http-Method`` header (GET when absent). GET and DELETE send the
        params as the query string. POST sends them as the JSON body: an object, or an array for OKX's batch
        endpoints and cancel-algos, given as params themselves or as their JSON text (sent as it is).
        """
        if not re.match(r"^/api/[\x21-\x7e]*$", path) or "?" in path or "#" in path:
            raise BadRequest("exchange.IO path must be an OKX path such as /api/v5/account/balance, "
                             "with the query as params; got %s" % _describe(path))
        verb = (self.request.http_method or "GET").upper()
        if verb not in ("GET", "POST", "DELETE"):
            raise BadRequest("Http-Method must be GET, POST or DELETE, got %s" % _describe(verb))
        body = passthrough_body(params) if verb == "POST" else None
        if verb != "POST" and not isinstance(params, dict):
            raise BadRequest("exchange.IO %s sends its params as a query string: they must be an object, "
                             "got %s" % (verb, type(params).__name__))
        credentials = self.credentials if self.request.access_key else None
        status, envelope = self.client.request(
            verb, path, params=params if verb != "POST" else None, body=body,
            credentials=credentials, deadline=self.deadline, demo=self.demo)
        raise_for_code(envelope, status, path)
        if verb == "POST" and path.startswith("/api/v5/account/") and credentials is not None:
            # e.g. set-position-mode: what the plugin cached of the account may have changed
            self.client.forget("account", (credentials.api_key, credentials.demo))
        if verb == "POST" and path.startswith("/api/v5/trade/") and credentials is not None:
            stream = self._account_stream()
            if stream:
                stream.wrote_through_io()     # orders written here: the account is read from REST a while
        return envelope, None


def passthrough_body(params: Any) -> Any:
    """The JSON body of an exchange.IO POST: the params object or array, or the JSON text of one. A query
    string parser makes of a JSON text one key with an empty value: that key is the text."""
    if isinstance(params, dict) and len(params) == 1 and list(params.values()) == [""]:
        text = next(iter(params))
        if text.strip()[:1] in ("[", "{"):
            params = text
    if isinstance(params, str):
        try:
            parsed = loads_exact(params)
        except (ValueError, RecursionError):
            raise BadRequest("exchange.IO POST params must be an object, an array or their JSON text, got %s"
                             % _describe(params)) from None
        if not isinstance(parsed, (dict, list)):
            raise BadRequest("exchange.IO POST params must be an object or an array, got %s" % _describe(params))
        return params.strip()
    return params


# =====================================================================================================
# DISPATCH: docker method -> handler and parameters
# =====================================================================================================

_REQUIRED = object()


class Param:
    """One parameter of a docker method: where it is read (``name`` and other accepted spellings),
    how it is parsed (``parse(value, params)``), and its default (none: it is required)."""

    def __init__(self, name, parse, default=_REQUIRED, aliases=(), arg=None):
        self.name, self.parse, self.default = name, parse, default
        self.spellings = (name,) + tuple(aliases)
        self.arg = arg or name

    def read(self, params):
        for spelling in self.spellings:
            value = params.get(spelling)
            if value is not None and value != "":
                return self.parse(value, params, spelling)
        if self.default is _REQUIRED:
            raise BadRequest("params.%s is required" % self.name)
        return self.default


_known_symbols = LastUsed(1000)           # (symbol, contract type) -> Symbol: parsed once


def _symbol(value, params, name):
    key = (value, params.get("contract_type") or params.get("contractType"))
    symbol = _known_symbols.get(key) if isinstance(value, str) and isinstance(key[1], (str, type(None))) else None
    if symbol is None:
        symbol = Symbol(*split_symbol(*key))
        if isinstance(value, str) and isinstance(key[1], (str, type(None))):
            _known_symbols[key] = symbol
    return symbol


def _contract(value, params, name):
    if not isinstance(value, str):
        raise BadRequest("%s must be a string like swap, got %s" % (name, _describe(value)))
    if name == "symbol":                 # a contract's symbol picks its kind: BTC_USDT.swap -> swap
        return split_symbol(value)[2]
    value = value.strip().lower()
    return "" if value == "spot" else value


def _text(value, params, name):
    if not isinstance(value, str):
        raise BadRequest("%s must be a string, got %s" % (name, _describe(value)))
    return value.strip()


def _order_id(value, params, name):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest("%s must be an order id like ETH-USDT,123456, got %s" % (name, _describe(value)))
    return str(value).strip()


def _price(value, params, name):
    """A positive decimal, or -1: a market order's price, or "keep" for an amendment's price or amount."""
    return decimal_text(value, name, allow_negative_one=True)


def _family(value, params, name):
    """The underlying of the request's symbol, as OKX names an option family: ``BTC_USD`` -> ``BTC-USD``."""
    if not isinstance(value, str) or "_" not in value:
        return None
    base, quote, _ = split_symbol(value.partition(".")[0])
    return "%s-%s" % (base, quote)


def _condition(value, params, name):
    return parse_condition(value, name)


def _condition_change(value, params, name):
    return parse_condition(value, name, partial=True)


def _io_code(value, params, name):
    return parse_int(value, name, 0, 99)


def _io_args(value, params, name):
    if isinstance(value, (str, int, Decimal)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise BadRequest("%s must be a list of the call's arguments, got %s" % (name, _describe(value)))
    return value


def _amount(value, params, name):
    return decimal_text(value, name)


def _count(minimum, maximum, zero_means=None):
    """A whole number within bounds; 0 stands for ``zero_means`` when given (FMZ's "default")."""
    def parse(value, params, name):
        number = parse_int(value, name, 0 if zero_means is not None else minimum, maximum)
        return zero_means if number == 0 and zero_means is not None else number
    return parse


SYMBOL = Param("symbol", _symbol)
OPTIONAL_SYMBOL = Param("symbol", _symbol, default=None)
CONTRACT = Param("contract_type", _contract, default="", aliases=("contractType", "instType", "symbol"),
                 arg="contract")
ORDER_ID = Param("id", _order_id, aliases=("orderId", "order_id"))
LEVERAGE = ("marginLevel", "margin_level", "leverage")
FAMILY = Param("symbol", _family, default=None, arg="family")
CONDITION = Param("condition", _condition, aliases=("Condition",))



class Method(collections.namedtuple("Method", "handler params reads")):
    """One docker method: the BaseProtocol handler that serves it, the parameters it reads, and whether it
    only reads (then FMZ's strategy spelling, "Get" + name, reaches it too; one that acts never is)."""


def reads(handler, params=()):
    return Method(handler, list(params), True)


def acts(handler, params=()):
    return Method(handler, list(params), False)


# The docker's method names (matched case-insensitively; other spellings below) and, for each, the
# handler of BaseProtocol/OKX that serves it with the parameters it reads.
DISPATCH = {
    "ticker": reads("ticker", [SYMBOL]),
    "depth": reads("depth", [SYMBOL, Param("limit", _count(1, None, zero_means=DEFAULT_DEPTH), DEFAULT_DEPTH)]),
    "trades": reads("trades", [SYMBOL, Param("limit", _count(1, OKX_MAX_TRADES, zero_means=100), 100)]),
    "records": reads("records", [SYMBOL, Param("period", _count(1, None)),
                                 Param("limit", _count(1, MAX_RECORDS, zero_means=DEFAULT_RECORDS),
                                       DEFAULT_RECORDS)]),
    "tickers": reads("tickers", [CONTRACT, FAMILY]),
    "markets": reads("markets", [CONTRACT, FAMILY]),
    "accounts": reads("accounts"),
    "assets": reads("assets"),
    "trade": acts("trade", [SYMBOL, Param("type", _text), Param("price", _price), Param("amount", _amount),
                            Param("direction", _text, default=None),
                            Param(LEVERAGE[0], _amount, default=None, aliases=LEVERAGE[1:], arg="leverage")]),
    "orders": reads("orders", [OPTIONAL_SYMBOL]),
    "order": reads("order", [ORDER_ID, OPTIONAL_SYMBOL]),
    "historyorders": reads("historyorders", [OPTIONAL_SYMBOL, Param("since", _count(0, None), 0),
                                             Param("limit", _count(0, 1000), 0)]),
    "cancel": acts("cancel", [ORDER_ID, OPTIONAL_SYMBOL]),
    "modifyorder": acts("modifyorder", [ORDER_ID, OPTIONAL_SYMBOL, Param("price", _price, "-1"),
                                        Param("amount", _price, "-1"), Param("type", _text, None)]),
    "positions": reads("positions", [OPTIONAL_SYMBOL]),
    "setmarginlevel": acts("set_margin_level", [SYMBOL, Param(LEVERAGE[0], _amount, aliases=LEVERAGE[1:],
                                                              arg="margin_level")]),
    "fundings": reads("fundings", [OPTIONAL_SYMBOL]),
    "createconditionorder": acts("createconditionorder", [SYMBOL, Param("type", _text), Param("amount", _amount),
                                                          CONDITION, Param("direction", _text, default=None)]),
    "modifyconditionorder": acts("modifyconditionorder", [ORDER_ID, OPTIONAL_SYMBOL,
                                                          Param("amount", _price, "-1"),
                                                          Param("condition", _condition_change, None,
                                                                aliases=("Condition",)),
                                                          Param("type", _text, None)]),
    "cancelconditionorder": acts("cancelconditionorder", [ORDER_ID, OPTIONAL_SYMBOL]),
    "conditionorder": reads("conditionorder", [ORDER_ID, OPTIONAL_SYMBOL]),
    "conditionorders": reads("conditionorders", [OPTIONAL_SYMBOL]),
    "historyconditionorders": reads("historyconditionorders", [OPTIONAL_SYMBOL, Param("since", _count(0, None), 0),
                                                               Param("limit", _count(0, 1000), 0)]),
    "io": acts("io", [Param("code", _io_code), Param("args", _io_args, []), OPTIONAL_SYMBOL]),
}

# Other spellings of the same methods, from FMZ's strategy functions and the reference example.
METHOD_SPELLINGS = {
    "getaccount": "accounts", "createorder": "trade", "cancelorder": "cancel",
    "getposition": "positions", "position": "positions",
    "marginlevel": "setmarginlevel", "setleverage": "setmarginlevel",
    "getfunding": "fundings", "funding": "fundings",
}

API_PREFIX = "__api_"           # exchange.IO("api", verb, path, ...) arrives as method "__api_" + path
UNKNOWN_METHODS_LOGGED = 256    # unknown method names warned about once each, at most this many


def resolve_method(method: Any, params: Optional[Dict[str, Any]] = None) -> str:
    """The DISPATCH key of a docker method name: matched in any letter case with ``_`` and ``-`` ignored,
    FMZ's "Get" spelling of a method that reads, and the other spellings above. A ``trade`` (or a
    ``conditionorder``) that carries a condition places a condition order. BadRequest if unknown."""
    if not isinstance(method, str) or not method.strip():
        raise BadRequest("method must be a non-empty string, got %s" % _describe(method))
    name = method.strip().lower().replace("_", "").replace("-", "")
    name = METHOD_SPELLINGS.get(name, name)
    if name.startswith("get") and name[3:] in DISPATCH and DISPATCH[name[3:]].reads:   # GetTicker, getmarkets
        return name[3:]             # a "Get" spelling only ever reads
    if name not in DISPATCH:
        raise BadRequest("unknown method %s; known: %s, and %s<path> for exchange.IO"
                         % (_describe(method), ", ".join(sorted(DISPATCH)), API_PREFIX))
    if name in ("trade", "conditionorder") and isinstance(params, dict) and (
            any(_condition_given(params.get(spelling)) for spelling in CONDITION.spellings)
            or name == "conditionorder" and "amount" in params):
        name = "createconditionorder"
    return name


def _condition_given(value):
    """Whether a request's ``condition`` asks for a condition order: not when absent or empty (``{}``,
    ``[]``, ``null``, or the JSON text of one of those)."""
    if isinstance(value, str):
        value = value.strip()
        return value not in ("", "{}", "[]", "null")
    return value not in (None, {}, [])


_unknown_methods = set()


def dispatch(protocol: "BaseProtocol", method: str, params: Any) -> Tuple[Any, Any]:
    """Run one docker method on a protocol instance; returns ``(data, raw)``. An unknown method name is
    logged once, with the names (never the values) of its parameters, so that an operator can tell what
    the docker sent."""
    if method[:len(API_PREFIX)].lower() == API_PREFIX:
        _context.counted = API_PREFIX
        return protocol.api(method[len(API_PREFIX):], params)
    try:
        name = resolve_method(method, params)
        _context.counted = name
    except BadRequest:
        key = method.strip().lower().replace("_", "").replace("-", "")[:64]
        if key not in _unknown_methods and len(_unknown_methods) < UNKNOWN_METHODS_LOGGED:
            _unknown_methods.add(key)
            names = sorted(_loggable(str(name)[:40]) for name in params)[:20] if isinstance(params, dict) else []
            log.warning("the docker sent method %s, which the plugin does not know (its params: %s); if FMZ "
                        "names a known method so, please report it", _describe(method), ", ".join(names) or "none")
        raise
    entry = DISPATCH[name]
    arguments = {param.arg: param.read(params) for param in entry.params}
    return getattr(protocol, entry.handler)(**arguments)


# =====================================================================================================
# The HTTP server the docker talks to
# =====================================================================================================

EXCHANGES = {"okx": (OKX, OKXShared)}   # last path segment of the service address -> (protocol, shared state)


class _MethodLogFilter(logging.Filter):
    """Adds ``%(docker_method)s`` to every log record: the docker method its thread is serving."""

    def filter(self, record):
        record.docker_method = getattr(_context, "method", "-")
        return True


class CallCounts:
    """Calls, errors and OKX requests per docker method, for GET /status (thread-safe, bounded: unknown
    method names count together)."""

    def __init__(self):
        self._counts = {}
        self._lock = threading.Lock()

    def add(self, method, what, count=1):
        with self._lock:
            if method not in self._counts and len(self._counts) >= 64:
                method = "(other)"
            entry = self._counts.setdefault(method, {"calls": 0, "errors": 0, "okx_requests": 0})
            entry[what] += count

    def snapshot(self):
        with self._lock:
            return {method: dict(entry) for method, entry in sorted(self._counts.items())}


class DockerHandler(http.server.BaseHTTPRequestHandler):
    """Serves the FMZ docker: ``POST /<Exchange>`` with a JSON body, answered with JSON.

    Connections are kept alive (HTTP/1.1). Every answer is HTTP 200 with ``{"data": ..., "raw": ...}`` or
    ``{"error": "..."}``, including for malformed requests; a request whose body cannot be read (no or a
    false Content-Length, too large, too slow) also closes the connection. Only what is not HTTP at all (a
    garbled request line, headers too long) gets a 4xx status, still with a JSON error body. ``GET /status``
    answers the operator's status page (``PluginServer.status``); every other verb or path an error.
    """

    protocol_version = "HTTP/1.1"
    server_version = "fmz-okx-plugin/" + __version__
    timeout = CLIENT_READ_TIMEOUT         # bounds reading a request and idle keep-alive time
    disable_nagle_algorithm = True        # answers go out at once, not after a delayed ACK
    _date = (0, "")                       # (second, Date header value) shared by every handler

    def parse_request(self):
        """As http.server's, but the header lines are read with a plain loop: the email parser http.server
        uses costs more than the rest of a call answered from memory. An unusual request line goes to
        http.server's own parser."""
        words = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n").split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            return super().parse_request()
        self.requestline = " ".join(words)
        self.command, self.path, self.request_version = words
        self.close_connection = words[2] == "HTTP/1.0"
        try:
            self.headers = headers = read_header_fields(self.rfile)
        except ValueError as exc:
            self.send_error(400 if str(exc) == "Bad header line" else 431, str(exc))
            return False
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if headers.get("expect", "").lower() == "100-continue" and words[2] == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def do_POST(self):
        started = time.monotonic()
        _context.method, _context.counted = "-", "(bad request)"
        try:
            body = self._read_body()
            exchange, request, method, params = self._parse(body)
            _context.method, _context.counted = _loggable(method), "(unknown)"
            protocol_class, _ = EXCHANGES[exchange]
            token = self.server.begin_call(method, request.nonce)
            try:
                data, raw = dispatch(protocol_class(request, self.server.exchanges[exchange]), method, params)
            finally:
                self.server.end_call(token)
            answer = {"data": data}
            if raw is not None:
                answer["raw"] = raw
        except ProtocolError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # a bug must not kill the server nor hide what happened
            log.exception("internal error")
            answer = {"error": "internal error in the plugin (%s); see the plugin's log" % type(exc).__name__}
        counts = self.server.counts
        counts.add(_context.counted, "calls")
        if "error" in answer:
            counts.add(_context.counted, "errors")
            log.warning("answered error in %.1f ms: %s", (time.monotonic() - started) * 1000, answer["error"])
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("answered in %.1f ms", (time.monotonic() - started) * 1000)
        self._answer(answer)
        _context.method, _context.counted = "-", None

    def _read_body(self):
        """The request body, or BadRequest (closing the connection when the body cannot be framed)."""
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported: send Content-Length")
        length_text = self.headers.get("Content-Length")
        digits = re.match(r"^\s*([0-9]+)\s*$", length_text or "")
        if digits is None:
            self.close_connection = True
            raise BadRequest("Content-Length header is missing or not a number")
        length = int(digits.group(1)) if len(digits.group(1)) <= 15 else MAX_REQUEST_BYTES + 1
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            raise BadRequest("request body of %s bytes is larger than the %d allowed"
                             % (digits.group(1), MAX_REQUEST_BYTES))
        try:
            body = self.rfile.read(length)
        except (socket.timeout, OSError):
            self.close_connection = True
            raise BadRequest("request body did not arrive within %g s" % self.timeout) from None
        if len(body) < length:
            self.close_connection = True
            raise BadRequest("request body is shorter than its Content-Length")
        return body

    def _parse(self, body):
        """``(exchange, DockerRequest, method, params)`` of a request body; BadRequest when malformed."""
        exchange = _exchange_of(self.path)
        if exchange not in EXCHANGES:
            raise BadRequest("unknown exchange %s in the path: use /%s"
                             % (_describe(exchange), " or /".join(name.upper() for name in EXCHANGES)))
        envelope = parse_docker_json(body)
        if not isinstance(envelope, dict):
            raise BadRequest("request body must be a JSON object, got %s" % type(envelope).__name__)
        method = envelope.get("method")
        if not isinstance(method, str) or not method.strip():
            raise BadRequest("method is missing or not a string")
        params = envelope.get("params")
        if params is None:
            params = {}
        passthrough = method.strip()[:len(API_PREFIX)].lower() == API_PREFIX
        if not isinstance(params, dict) and not (passthrough and isinstance(params, (list, str))):
            raise BadRequest("params must be a JSON object, got %s" % type(params).__name__)
        if isinstance(params, dict):
            for field in ("code", "args"):    # the older io form may carry them beside params
                if field in envelope and field not in params:
                    params = dict(params, **{field: envelope[field]})
        for field in ("access_key", "secret_key"):
            if not isinstance(envelope.get(field, ""), str):
                raise BadRequest("%s must be a string" % field)
        request = DockerRequest(envelope.get("access_key", ""), envelope.get("secret_key", ""),
                                envelope.get("nonce"), self.headers.get("Http-Method"),
                                self.server.config.clock.monotonic() + self.server.config.timeout)
        return exchange, request, method.strip(), params

    def _answer(self, answer, status=200):
        body = encode_answer(answer)
        head = ("HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n" % (status, self.responses.get(status, ("",))[0], self.server_version,
                                             self.date_time_string(), len(body)))
        if self.close_connection:
            head += "Connection: close\r\n"
        try:
            self.wfile.write((head + "\r\n").encode("latin-1") + body)
        except OSError:            # the docker went away; nothing to tell it
            self.close_connection = True

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/status":
            return self._wrong_verb()
        _context.method = "status"
        self._answer(self.server.status())
        _context.method = "-"

    def _wrong_verb(self):
        _context.method = "-"
        self.close_connection = True
        self._answer({"error": "only POST is supported: the FMZ docker sends POST /<Exchange> with a JSON body"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _wrong_verb

    def send_error(self, code, message=None, explain=None):
        """Malformed HTTP (bad request line, headers too long): a JSON error, then close."""
        self.close_connection = True
        self._answer({"error": "malformed HTTP request (HTTP %d %s)" % (code, self.responses.get(code, ("",))[0])},
                     status=code)

    def version_string(self):
        """The Server header names the plugin only, not the Python under it."""
        return self.server_version

    def date_time_string(self, timestamp=None):
        """The Date header, formatted once a second (it is the same for every answer of that second)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        cached = DockerHandler._date
        if cached[0] != second:
            cached = DockerHandler._date = (second, super().date_time_string(second))
        return cached[1]

    def log_message(self, format, *args):
        log.debug("docker %s: " + format, self.address_string(), *args)


_exchanges_of_paths = {}


def _exchange_of(path):
    """The exchange a request path names: its last segment, lower case (``/OKX`` -> ``okx``)."""
    exchange = _exchanges_of_paths.get(path)
    if exchange is None:
        exchange = urllib.parse.urlsplit(path).path.rstrip("/").rsplit("/", 1)[-1].lower()
        if exchange in EXCHANGES and len(_exchanges_of_paths) < 64:
            _exchanges_of_paths[path] = exchange
    return exchange


class PluginServer(http.server.ThreadingHTTPServer):
    """The plugin: a threaded HTTP server (a thread per docker connection, at most
    MAX_DOCKER_CONNECTIONS at once) with one shared client per exchange."""

    daemon_threads = True
    block_on_close = False                # threads are not tracked: none is leaked or waited for
    request_queue_size = 1024             # listen backlog: a burst of connections is not turned away

    def __init__(self, address, config, handler=DockerHandler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.config = config
        self.exchanges = {name: shared_class(config) for name, (_, shared_class) in EXCHANGES.items()}
        self.counts = CallCounts()
        self.started_at = config.clock.monotonic()
        self._calls, self._serial = {}, 0      # docker calls being served: token -> (method, nonce)
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._active_lock:
            full = self._active >= MAX_DOCKER_CONNECTIONS
            if not full:
                self._active += 1
        if full:
            log.warning("more than %d docker connections at once: closing a new one", MAX_DOCKER_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._active_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def status(self):
        """GET /status: version, uptime, each live stream (an account stream named by the first 4 characters
        of its key), the rate-limit buckets in use, and calls, errors and OKX requests per docker method.
        It holds no secret, passphrase or full key."""
        counts = self.counts.snapshot()
        answer = {"version": __version__, "uptime_s": round(self.config.clock.monotonic() - self.started_at, 1),
                  "docker_connections": self._active, "exchanges": {}}
        for name, shared in self.exchanges.items():
            part = shared.status() if hasattr(shared, "status") else {}
            for method, okx_requests in part.pop("okx_requests_by_method", {}).items():
                counts.setdefault(method, {"calls": 0, "errors": 0, "okx_requests": 0})["okx_requests"] = okx_requests
            answer["exchanges"][name] = part
        answer["methods"] = counts
        return answer

    def begin_call(self, method, nonce):
        """A docker call is being served: remembered until ``end_call``, for a stop in its middle."""
        with self._active_lock:
            self._serial += 1
            self._calls[self._serial] = (method, nonce)
            return self._serial

    def end_call(self, token):
        with self._active_lock:
            self._calls.pop(token, None)

    def drain(self, seconds):
        """Wait up to ``seconds`` (real time: the process is stopping) for the calls being served; then log
        each one that may have sent an order, so that the operator can check it at OKX."""
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            with self._active_lock:
                if not self._calls:
                    return
            time.sleep(0.02)
        with self._active_lock:
            calls = list(self._calls.values())
        for method, nonce in calls:
            try:
                acts = method[:len(API_PREFIX)].lower() == API_PREFIX or not DISPATCH[resolve_method(method)].reads
            except BadRequest:
                acts = False
            if acts:
                log.warning("stopped while serving %s (nonce %s): it may have reached OKX; check the orders and "
                            "condition orders of this key (their client id ends in the nonce's digits)",
                            _loggable(method), _describe(nonce))

    def handle_error(self, request, client_address):
        """A docker connection failed outside a request (e.g. reset): a log line, not a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("docker connection %s: %s", client_address, _os_error_text(error))
        else:
            log.exception("error on docker connection %s", client_address)

    def server_close(self):
        super().server_close()
        for shared in self.exchanges.values():
            shared.close()


# =====================================================================================================
# Command line
# =====================================================================================================

class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a wrong flag in one line, pointing at --help."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def build_parser():
    parser = _OneLineParser(
        prog="fmz_custom_protocol.py",
        description="FMZ Quant custom-protocol plugin for OKX v5 (spot, perpetual swaps, delivery futures, "
                    "options). "
                    "In FMZ, add a Custom Protocol exchange with service address http://ADDRESS:PORT/OKX, "
                    "Access Key = OKX API key, Secret Key = SECRET,PASSPHRASE (append ,simulate for demo trading).")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="address to listen on (default %(default)s: only this machine; anything else "
                             "lets others use your keys' plugin)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default %(default)s)")
    parser.add_argument("--api-base", default=DEFAULT_API_BASE, metavar="URL",
                        help="OKX REST base URL (default %(default)s; https://eea.okx.com for EEA keys, "
                             "https://us.okx.com for OKX US keys)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="longest time one docker call may take, OKX round trips included "
                             "(default %(default)s)")
    parser.add_argument("--margin-mode", choices=("cross", "isolated"), default="cross",
                        help="margin mode of swap and futures orders and leverage (default %(default)s)")
    parser.add_argument("--proxy", metavar="URL",
                        help="HTTP proxy to reach OKX through, http://[user:password@]host:port "
                             "(default: HTTPS_PROXY / https_proxy unless NO_PROXY matches)")
    parser.add_argument("--ca-file", metavar="PATH",
                        help="CA certificates (PEM) to trust besides the system's, e.g. a TLS-inspecting "
                             "proxy's; certificates are always verified")
    parser.add_argument("--ws-base", metavar="URL",
                        help="OKX WebSocket base, wss://host[:port] (default follows --api-base: "
                             "wss://ws.okx.com:8443, demo keys wss://wspap.okx.com:8443)")
    parser.add_argument("--no-stream", action="store_true",
                        help="no live streams: every call goes to OKX's REST API")
    parser.add_argument("--no-private-stream", action="store_true",
                        help="keep the live market stream, but read balances, positions and orders over REST "
                             "(no private WebSocket logins)")
    parser.add_argument("--stream-idle", type=float, default=DEFAULT_STREAM_IDLE, metavar="SECONDS",
                        help="unsubscribe an instrument nobody asked about, and close a key's account stream "
                             "nobody read, after this long (default %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        type=str.lower, help="log detail on stderr (default %(default)s); never shows secrets")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def configure_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(docker_method)s] %(message)s"))
    handler.addFilter(_MethodLogFilter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def config_from_args(args, parser):
    """Config from parsed flags, each checked exactly as it is used later: a bad value ends the program
    with one line (exit status 2)."""
    try:
        service_url(args.api_base, ("https", "http"), "--api-base")
        if args.ws_base:
            service_url(args.ws_base, ("wss", "ws"), "--ws-base")
        if args.proxy:
            Proxy(args.proxy)
        else:   # the variables' proxy for each host the plugin may reach
            for url in [args.api_base, args.ws_base] + list(STREAM_BASES.get(urllib.parse.urlsplit(
                    args.api_base).hostname or "", ())):
                if url:
                    Proxy.from_environment(url.replace("wss://", "https://").replace("ws://", "http://"))
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error("--timeout must be a number of seconds greater than 0")
    if args.ca_file and not os.path.exists(args.ca_file):
        parser.error("--ca-file %s does not exist" % args.ca_file)
    if args.ca_file:
        try:
            tls_context(args.ca_file)
        except (ssl.SSLError, OSError) as exc:
            parser.error("--ca-file %s holds no PEM CA certificates (%s)"
                         % (args.ca_file, getattr(exc, "reason", None) or _os_error_text(exc)))
    args.api_base = _lower_scheme(args.api_base)
    args.ws_base = args.ws_base and _lower_scheme(args.ws_base)
    if not (math.isfinite(args.stream_idle) and args.stream_idle > 0):
        parser.error("--stream-idle must be a number of seconds greater than 0")
    return Config(api_base=args.api_base, timeout=args.timeout, margin_mode=args.margin_mode, proxy=args.proxy,
                  ca_file=args.ca_file, ws_base=args.ws_base, stream=not args.no_stream,
                  stream_idle=args.stream_idle, private_stream=not args.no_private_stream)


def _lower_scheme(url):
    """``HTTPS://Host`` -> ``https://Host``: the plugin compares schemes as text."""
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest if sep else url


def _stop(signum, frame):
    raise SystemExit(0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the plugin until SIGTERM or Ctrl-C; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    configure_logging(args.log_level)
    try:
        server = PluginServer((args.address, args.port), config)
    except OSError as exc:
        sys.stderr.write("fmz_custom_protocol.py: error: cannot listen on %s:%d: %s\n"
                         % (args.address, args.port, _os_error_text(exc)))
        # A port in use may be free later (exit 1: systemd restarts); any other refusal (an address this
        # machine does not have, a port it may not use) will not change: exit 2, as a wrong flag.
        return 1 if exc.errno == errno.EADDRINUSE else 2
    except (ValueError, ssl.SSLError) as exc:
        sys.stderr.write("fmz_custom_protocol.py: error: %s\n" % exc)
        return 1
    if args.address not in ("127.0.0.1", "localhost", "::1") and not args.address.startswith("127."):
        log.warning("listening on %s: anyone who reaches this address can use the plugin; "
                    "keep it behind a firewall or use --address 127.0.0.1", args.address)
    signal.signal(signal.SIGTERM, _stop)
    host = "[%s]" % args.address if ":" in args.address else args.address
    log.info("fmz_custom_protocol %s listening on http://%s:%d/OKX (OKX at %s)",
             __version__, host, server.server_address[1], config.api_base)
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.drain(STOP_DRAIN_SECONDS)
        server.server_close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
