#!/usr/bin/env python3
"""A minimal S3 client for the s3 suite: the suite looks at buckets through
the S3 API, so it runs the same against any server (s3s-fs, RADOS Gateway).

mb BUCKET                 create a bucket (one that exists already is fine)
ls BUCKET PREFIX          print the keys under PREFIX, one a line
get BUCKET KEY            the object's bytes to stdout; exit 1 if there is none
exists BUCKET KEY         exit 0 if the object exists, 1 if not
put BUCKET KEY            store stdin as the object
rm BUCKET KEY             delete the object
race BUCKET PREFIX N      N rounds: two conditional creates (If-None-Match: *)
                          of one new key at the same moment; prints how many
                          rounds had one winner, two or none; exit 1 if any
                          round had two (the server does not make the
                          condition atomic), 2 if any had none, or an answer
                          other than 200/412, or a later create of an
                          existing key was not refused

S3_ENDPOINT (http://HOST:PORT), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
say where and as whom; path-style requests, signature v4, region us-east-1
(AWS_REGION overrides). Standard library only.
"""

import datetime
import hashlib
import hmac
import http.client
import os
import sys
import threading
import urllib.parse
import xml.etree.ElementTree as ET

TIMEOUT = 30


def quote(s, safe="/"):
    return urllib.parse.quote(s, safe=safe + "-_.~")


class Client:
    def __init__(self):
        ep = urllib.parse.urlsplit(os.environ["S3_ENDPOINT"])
        if ep.scheme != "http":
            print("s3req: only http:// endpoints (tests on loopback)", file=sys.stderr)
            sys.exit(2)
        self.host = ep.netloc
        self.key = os.environ["AWS_ACCESS_KEY_ID"]
        self.secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        self.region = os.environ.get("AWS_REGION", "us-east-1")
        self.conn = http.client.HTTPConnection(self.host, timeout=TIMEOUT)

    def reconnect(self):
        self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, timeout=TIMEOUT)
        self.conn.connect()

    def _sign(self, method, path, query, headers, body):
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        headers = dict(headers)
        headers["host"] = self.host
        headers["x-amz-date"] = amz_date
        headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
        signed = sorted(k.lower() for k in headers)
        lower = {k.lower(): str(v).strip() for k, v in headers.items()}
        canon_query = "&".join(
            f"{quote(k, '')}={quote(v, '')}" for k, v in sorted(query.items())
        )
        canonical = "\n".join(
            [
                method,
                quote(path),
                canon_query,
                "".join(f"{k}:{lower[k]}\n" for k in signed),
                ";".join(signed),
                headers["x-amz-content-sha256"],
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        k = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={sig}"
        )
        return headers

    def request(self, method, path, query=None, body=b"", headers=None):
        """(status, body bytes) of one request on this client's connection."""
        query = query or {}
        h = self._sign(method, path, query, headers or {}, body)
        url = quote(path)
        if query:
            url += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        self.conn.request(method, url, body=body, headers=h)
        r = self.conn.getresponse()
        return r.status, r.read()


def fail(what, status, body):
    """Exit 2: an error, not the "no such object" answer (exit 1)."""
    print(f"s3req: {what}: HTTP {status}: {body[:300].decode(errors='replace')}", file=sys.stderr)
    sys.exit(2)


def keys(c, bucket, prefix):
    token = None
    while True:
        q = {"list-type": "2", "prefix": prefix}
        if token:
            q["continuation-token"] = token
        st, body = c.request("GET", f"/{bucket}", q)
        if st != 200:
            fail(f"list {bucket}/{prefix}", st, body)
        root = ET.fromstring(body)
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        for e in root.iter(f"{ns}Contents"):
            yield e.findtext(f"{ns}Key")
        token = root.findtext(f"{ns}NextContinuationToken")
        if root.findtext(f"{ns}IsTruncated") != "true" or not token:
            return


def race(bucket, prefix, rounds):
    """Two clients, each on its own connection, send their conditional
    creates of the same new key together (a barrier), round after round."""
    clients = [Client(), Client()]
    counts = {0: 0, 1: 0, 2: 0}
    other = []
    for n in range(rounds):
        key = f"/{bucket}/{prefix}/{n}"
        gate = threading.Barrier(2)
        got = [None, None]

        def put(i):
            body = f"writer {i} round {n}".encode()
            # A new connection each round, made before the gate: a server
            # may close one after an error answer.
            clients[i].reconnect()
            gate.wait()
            got[i] = clients[i].request("PUT", key, body=body, headers={"If-None-Match": "*"})

        ts = [threading.Thread(target=put, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wins = sum(1 for st, _ in got if st == 200)
        other += [st for st, _ in got if st not in (200, 412)]
        counts[wins] += 1
    # One at a time, a create of an existing key is refused.
    st, _ = clients[0].request("PUT", f"/{bucket}/{prefix}/0", body=b"late", headers={"If-None-Match": "*"})
    print(
        f"{rounds} rounds of two concurrent If-None-Match: * creates: "
        f"{counts[1]} with one winner, {counts[2]} with two, {counts[0]} with none"
        + (f"; other answers {sorted(set(other))}" if other else "")
        + (f"; a later create of an existing key got HTTP {st}" if st != 412 else "")
    )
    if counts[0] or other or st != 412:
        return 2
    return 1 if counts[2] else 0


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, bucket = argv[1], argv[2]
    arg = argv[3] if len(argv) > 3 else ""
    c = Client()
    if cmd == "mb":
        st, body = c.request("PUT", f"/{bucket}")
        # An existing bucket: RGW answers 200 or BucketAlreadyOwnedByYou,
        # s3s-fs BucketAlreadyExists (it has one user).
        if st != 200 and b"BucketAlreadyOwnedByYou" not in body and b"BucketAlreadyExists" not in body:
            fail(f"create bucket {bucket}", st, body)
    elif cmd == "ls":
        for k in keys(c, bucket, arg):
            print(k)
    elif cmd in ("get", "exists"):
        st, body = c.request("GET" if cmd == "get" else "HEAD", f"/{bucket}/{arg}")
        if st == 404:
            return 1
        if st != 200:
            fail(f"{cmd} {bucket}/{arg}", st, body)
        if cmd == "get":
            sys.stdout.buffer.write(body)
    elif cmd == "put":
        st, body = c.request("PUT", f"/{bucket}/{arg}", body=sys.stdin.buffer.read())
        if st != 200:
            fail(f"put {bucket}/{arg}", st, body)
    elif cmd == "rm":
        st, body = c.request("DELETE", f"/{bucket}/{arg}")
        if st not in (200, 204):
            fail(f"delete {bucket}/{arg}", st, body)
    elif cmd == "race":
        return race(bucket, arg, int(argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except OSError as e:
        print(f"s3req: {os.environ.get('S3_ENDPOINT')}: {e}", file=sys.stderr)
        sys.exit(2)
