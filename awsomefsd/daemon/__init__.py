"""The composition (floor 7): the single node (`node`), a cluster member (`member`), the founding
and joining of a cluster (`formation`), the device's ownership claims (`ownership`), the CSI volumes
service (`volumes`) and the tiering service (`tiering`) build the lower packages' parts in
dependency order. Only the commands (`awsomefsd.cli.main`) import it."""
