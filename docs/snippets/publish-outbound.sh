# Ask Switchboard to write to a customer: one outbound request, keyed by the
# customer id so one customer's requests stay in order.
: "${BROKERS:=127.0.0.1:9092}" "${PREFIX:=switchboard.}"
CUSTOMER_ID="$1"
printf '%s\n' "{\"schema\":\"switchboard.outbound.v1\",\"idempotency_key\":\"crm-reply-$CUSTOMER_ID\",\"customer_id\":\"$CUSTOMER_ID\",\"channel\":\"api\",\"text\":\"Your parcel ships today.\"}" |
  kcat -P -b "$BROKERS" -t "${PREFIX}outbound.v1" -k "$CUSTOMER_ID"
