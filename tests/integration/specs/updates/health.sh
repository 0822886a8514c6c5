#!/bin/sh
# Boot assessment of the test image: a version built with the "broken" marker fails it.
. /usr/lib/os-release
if [ -e /usr/lib/particle-test/broken ]; then
    echo "PARTICLE-HEALTH version=$IMAGE_VERSION result=bad"
    exit 1
fi
echo "PARTICLE-HEALTH version=$IMAGE_VERSION result=good"
