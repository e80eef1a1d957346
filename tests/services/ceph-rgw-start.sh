#!/bin/bash
# A single-node Ceph cluster (mon + memstore OSD + RADOS Gateway) on 127.0.0.1 without cephx:
# a real S3 endpoint for the tests. Data lives in memory and is gone when the daemons stop.
# Usage: ceph-rgw-start.sh DIR S3_PORT MON_PORT          Stop: kill $(cat DIR/run/*.pid)
# Env: S3_KEY / S3_SECRET set the test user's credentials.
set -euo pipefail
D=$1; PORT=$2; MON_PORT=$3
rm -rf "$D"; mkdir -p "$D"/{run,log,mon,osd,rgw}; cd "$D"
FSID=$(cat /proc/sys/kernel/random/uuid)
# "ms ... mode = crc" everywhere: with the default (secure) modes and no cephx, radosgw hangs.
cat > ceph.conf <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms client mode = crc
ms mon service mode = crc
ms service mode = crc
ms mon cluster mode = crc
ms cluster mode = crc
ms bind ipv6 = false
ms bind msgr1 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
keyring = $D/keyring
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $D/rgw
CONF
ceph-authtool --create-keyring keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$MON_PORT]" --fsid "$FSID" monmap >/dev/null
ceph-mon -c ceph.conf --mkfs -i a --monmap monmap --keyring keyring
ceph-mon -c ceph.conf -i a
ID=$(timeout 60 ceph -c ceph.conf osd create); mkdir -p osd/ceph-$ID
ceph-osd -c ceph.conf -i "$ID" --mkfs >/dev/null 2>&1
ceph-osd -c ceph.conf -i "$ID" 2>/dev/null
radosgw -c ceph.conf -n client.rgw.a
for _ in $(seq 1 120); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/")" = 200 ] && break; sleep 0.5
done
timeout 60 radosgw-admin -c ceph.conf user create --uid=test --display-name=test \
  --access-key="${S3_KEY:-testkey}" --secret-key="${S3_SECRET:-testsecret}" >/dev/null
echo "S3 ready at http://127.0.0.1:$PORT"
