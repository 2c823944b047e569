# Tell Switchboard that two identities are one person. Give every command an
# id: a command seen twice with one id is applied once.
: "${BROKERS:=127.0.0.1:9092}" "${PREFIX:=switchboard.}"
EMAIL="$1" PHONE="$2"
ID=$(cat /proc/sys/kernel/random/uuid)
printf '%s\n' "{\"schema\":\"switchboard.command.v1\",\"id\":\"$ID\",\"type\":\"identity.link\",\"a\":{\"kind\":\"email\",\"value\":\"$EMAIL\"},\"b\":{\"kind\":\"phone\",\"value\":\"$PHONE\"},\"evidence\":\"crm contact lists both\"}" |
  kcat -P -b "$BROKERS" -t "${PREFIX}commands.v1" -k "email:$EMAIL"
