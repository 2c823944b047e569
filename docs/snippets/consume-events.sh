# Read every event so far, one per line: key (customer id), then the JSON.
: "${BROKERS:=127.0.0.1:9092}" "${PREFIX:=switchboard.}"
kcat -C -b "$BROKERS" -t "${PREFIX}events.v1" -o beginning -e -q -f '%k %s\n'
